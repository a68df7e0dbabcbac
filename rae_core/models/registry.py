"""The one registry of named generator configurations, and how to build, size and cost them.

Three families: the flow models of RAE, `dit` (LightningDiT-style) and `ditdh` (with a wide DDT
head), and `dit_ddpm`, the original DiT of Peebles & Xie trained with IDDPM diffusion
(rae_core.diffusion). Paper models use the DiT table widths (DiT-DH heads 2048 wide, 2 deep, 16
heads); `DiT-S/2` ... `DiT-XL/8` are the original DiT at patch 2, 4, 8 (sized on a 4x32x32
SD-VAE latent). `tiny` models are for a laptop CPU (64-channel 4x4 latent, or 4x8x8 at patch 2)
and `micro` ones for seconds-long smoke tests.

Beside them, `AR_MODELS`: the scale-wise autoregressive generators on a multi-scale quantiser's
tokens, VAR (rae_core.models.var) and HART = VAR + a residual diffusion head, sized on VAR's
tokenizer (vocabulary 4096, 32 channels, scales 1..16) or, for `tiny` / `micro`, on the 32 px
digit tokenizers `vq-tiny` / `vq-micro` of rae_core.hybrid_vq (scales 1, 2, 3, 4).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rae_core.errors import ConfigError
from rae_core.models.blocks import swiglu_hidden
from rae_core.models.dit import DiT
from rae_core.models.dit_ddpm import DiTDDPM
from rae_core.models.ditdh import DiTDH
from rae_core.models.var import VAR


class ModelConfigError(ConfigError, ValueError):
    """An unknown model name, a bad override or a model narrower than its latent."""


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["dit", "ditdh", "dit_ddpm"]
    hidden: int
    depth: int
    heads: int
    head_hidden: int = 0  # DiT-DH head; 0 for a plain DiT
    head_depth: int = 0
    head_heads: int = 0
    mlp_ratio: float = 4.0
    qk_norm: bool = False  # the reference's released configs leave it off
    label_std: float = 0.02  # class-table init; see LabelEmbedder
    patch: int = 1  # a token is a patch x patch square of the latent
    double_silu: bool = False  # the released reference models' condition (see models/dit.py)

    @property
    def width(self) -> int:
        """The width the latent must pass through to be predicted: the head's for DiT-DH."""
        return self.head_hidden if self.family == "ditdh" else self.hidden

    @property
    def learn_sigma(self) -> bool:
        """The family's own choice: DiT-DDPM also predicts its variance, flow models do not."""
        return self.family == "dit_ddpm"


_BODIES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

MODELS: dict[str, ModelConfig] = {
    **{f"DiT-{k}": ModelConfig("dit", *v) for k, v in _BODIES.items()},
    **{f"DiTDH-{k}": ModelConfig("ditdh", *v, head_hidden=2048, head_depth=2, head_heads=16)
       for k, v in _BODIES.items()},
    **{f"DiT-{k}/{p}": ModelConfig("dit_ddpm", *v, patch=p)
       for k, v in _BODIES.items() for p in (2, 4, 8)},
    # CPU configs train for hundreds of steps, not hundreds of thousands: with a unit-scale
    # class table (label_std=1) DiTDH-tiny's samples after 600 steps matched their class 83% of
    # the time against 18% with 0.02 (CFG 5, s = 1; docs/benchmarks.md)
    "DiT-tiny": ModelConfig("dit", 128, 4, 4, label_std=1.0),
    # the head stays wider than the body (and than the 64-channel latent)
    "DiTDH-tiny": ModelConfig("ditdh", 96, 3, 4, head_hidden=128, head_depth=2, head_heads=4,
                              label_std=1.0),
    "DiT-micro": ModelConfig("dit", 64, 2, 2, label_std=1.0),
    "DiTDH-micro": ModelConfig("ditdh", 64, 2, 2, head_hidden=128, head_depth=2, head_heads=2,
                               label_std=1.0),
    # for a 4x8x8 VAE latent: 16 tokens of 16 values, as many tokens as a 64x4x4 RAE latent
    "DiTDH-tiny/2": ModelConfig("ditdh", 96, 3, 4, head_hidden=128, head_depth=2, head_heads=4,
                                label_std=1.0, patch=2),
    "DiT-tiny/2": ModelConfig("dit_ddpm", 128, 4, 4, label_std=1.0, patch=2),
    "DiT-micro/2": ModelConfig("dit_ddpm", 64, 2, 2, label_std=1.0, patch=2),
}


def reference_latent(name: str) -> tuple[int, int, int]:
    """(channels, grid, classes) of the latent a registered model is sized on: RAE's
    768x16x16 (DINOv2-B at 256 px) or, for patched models, SD-VAE's 4x32x32; the CPU configs'
    64x4x4 or 4x8x8 with 10 classes."""
    small = "tiny" in name or "micro" in name
    if get_config(name).patch > 1:
        return (4, 8, 10) if small else (4, 32, 1000)
    return (64, 4, 10) if small else (768, 16, 1000)


def get_config(name: str | ModelConfig, **overrides) -> ModelConfig:
    """The registered config (or the given one) with the non-None overrides applied."""
    if isinstance(name, ModelConfig):
        cfg = name
    elif name in MODELS:
        cfg = MODELS[name]
    else:
        close = difflib.get_close_matches(str(name), list(MODELS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ModelConfigError(f"unknown model {name!r}{hint} (valid: {', '.join(MODELS)})")
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"family"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ModelConfigError(f"unknown model override(s) {', '.join(unknown)} "
                               f"(valid: {', '.join(sorted(fields))})")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    _validate(_label(name, overrides), cfg)
    return cfg


def _label(name: str | ModelConfig, overrides: dict) -> str:
    base = name if isinstance(name, str) else f"{name.family} model"
    set_ = [f"{k}={v}" for k, v in overrides.items() if v is not None]
    return f"{base} ({', '.join(set_)})" if set_ else base


def _validate(label: str, cfg: ModelConfig) -> None:
    if cfg.patch < 1:
        raise ModelConfigError(f"{label}: patch must be positive, got {cfg.patch}")
    if cfg.family == "dit_ddpm" and (cfg.qk_norm or cfg.double_silu):
        raise ModelConfigError(f"{label}: the original DiT has no qk_norm and no double_silu")
    parts = [("", cfg.hidden, cfg.depth, cfg.heads)]
    if cfg.family == "ditdh":
        parts.append(("head_", cfg.head_hidden, cfg.head_depth, cfg.head_heads))
    for prefix, hidden, depth, heads in parts:
        if min(hidden, depth, heads) < 1:
            raise ModelConfigError(f"{label}: {prefix}hidden, {prefix}depth and {prefix}heads "
                                   f"must be positive, got {hidden}, {depth}, {heads}")
        if cfg.family == "dit_ddpm":  # no RoPE; the 2D sin-cos table needs a width of 4k
            if hidden % heads or hidden % 4:
                raise ModelConfigError(f"{label}: hidden {hidden} must be divisible by heads "
                                       f"{heads} and by 4 (2D sin-cos position embedding)")
        # 2D RoPE splits each head in two halves of rotation pairs; sin-cos likewise the width
        elif hidden % heads or (hidden // heads) % 4:
            raise ModelConfigError(f"{label}: {prefix}hidden {hidden} must split into "
                                   f"{prefix}heads {heads} of a size divisible by 4 (2D RoPE)")


def check_width(name_or_config: str | ModelConfig, in_channels: int, **overrides) -> None:
    """Refuse a model narrower than its tokens' p*p*C values (the RAE width rule)."""
    cfg = get_config(name_or_config, **overrides)
    need = cfg.patch * cfg.patch * in_channels
    if cfg.width < need:
        tokens = (f"latent's {in_channels} channels" if cfg.patch == 1 else
                  f"{need} values of a {cfg.patch}x{cfg.patch} patch of {in_channels} channels")
        raise ModelConfigError(
            f"hidden width {cfg.width} of {_label(name_or_config, overrides)} is below the "
            f"{tokens}: a DiT narrower than its tokens cannot even fit one sample (RAE width "
            f"rule); pick a model with hidden >= {need}")


def _learn_sigma(name: str | ModelConfig, cfg: ModelConfig, overrides: dict,
                 learn_sigma: bool | None) -> bool:
    if learn_sigma is None:
        return cfg.learn_sigma
    if learn_sigma and cfg.family != "dit_ddpm":
        raise ModelConfigError(f"{_label(name, overrides)}: learn_sigma is for dit_ddpm models; "
                               f"a {cfg.family} model predicts a velocity")
    return learn_sigma


def build_model(name: str | ModelConfig, in_channels: int, grid_size: int, num_classes: int,
                label_dropout: float = 0.1, allow_narrow: bool = False,
                learn_sigma: bool | None = None, **overrides) -> nn.Module:
    """A generator for (B, in_channels, grid_size, grid_size) latents; forward(x, t, y).

    `overrides` replace fields of the registered config (hidden, depth, heads, patch, ...; None
    is ignored). A model narrower than its tokens is refused unless `allow_narrow` (the width
    ablation builds such models on purpose). `learn_sigma` makes a dit_ddpm model also output
    C channels of variance interpolation (2C in all); None keeps the family's choice: True for
    dit_ddpm (DiT's recipe), False for the flow families, which refuse True.
    """
    cfg = get_config(name, **overrides)
    if not allow_narrow:
        check_width(name, in_channels, **overrides)
    if grid_size % cfg.patch:
        raise ModelConfigError(f"{_label(name, overrides)}: the {grid_size}x{grid_size} latent "
                               f"does not split into {cfg.patch}x{cfg.patch} patches")
    learn_sigma = _learn_sigma(name, cfg, overrides, learn_sigma)
    common = dict(in_channels=in_channels, grid_size=grid_size, num_classes=num_classes,
                  hidden=cfg.hidden, depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                  label_dropout=label_dropout, label_std=cfg.label_std, patch=cfg.patch)
    if cfg.family == "dit_ddpm":
        return DiTDDPM(**common, learn_sigma=learn_sigma)
    if cfg.family == "dit":
        return DiT(**common, qk_norm=cfg.qk_norm, double_silu=cfg.double_silu)
    return DiTDH(**common, qk_norm=cfg.qk_norm, head_hidden=cfg.head_hidden,
                 head_depth=cfg.head_depth, head_heads=cfg.head_heads,
                 double_silu=cfg.double_silu)


def count_params(name: str | ModelConfig, in_channels: int = 768, grid_size: int = 16,
                 num_classes: int = 1000, learn_sigma: bool | None = None, **overrides) -> int:
    """Trainable parameters, counted on the meta device (nothing is allocated).

    The fixed sin-cos position table is a buffer, not counted (the DiT paper's counts include
    it: (grid_size / patch)^2 x hidden values more)."""
    with torch.device("meta"):
        model = build_model(name, in_channels, grid_size, num_classes, allow_narrow=True,
                            learn_sigma=learn_sigma, **overrides)
    return sum(p.numel() for p in model.parameters())


def model_macs(name: str | ModelConfig, in_channels: int, grid_size: int,
               learn_sigma: bool | None = None, **overrides) -> int:
    """Forward multiply-accumulates of one image: every matmul (the patch conv as one), attention's
    QK^T and AV included; norms, activations and the label lookup are left out. The DiT paper's
    "GFLOPs" are these (DiT-XL/2 on a 4x32x32 latent: 118.6 G)."""
    cfg = get_config(name, **overrides)
    n = (grid_size // cfg.patch) ** 2  # tokens
    c = cfg.patch * cfg.patch * in_channels  # values per token
    d = cfg.hidden
    macs = n * c * d  # patch embedding
    if cfg.family == "dit_ddpm":
        out = 2 * c if _learn_sigma(name, cfg, overrides, learn_sigma) else c
        macs += 256 * d + d * d  # time embedding MLP (256 sinusoidal features)
        macs += cfg.depth * _block_macs(n, d, 2 * d * int(d * cfg.mlp_ratio), cond_tokens=1)
        return macs + 2 * d * d + n * d * out  # final adaLN and output linear
    swiglu = 3 * d * swiglu_hidden(d, cfg.mlp_ratio)  # w12 (d -> 2h) and w3 (h -> d)
    macs += 2 * 256 * d + d * d  # time embedding MLP (256 Fourier frequencies, sin and cos)
    macs += cfg.depth * _block_macs(n, d, swiglu, cond_tokens=1)
    if cfg.family == "dit":
        return macs + 2 * d * d + n * d * c  # final adaLN (per sample) and output linear
    dh = cfg.head_hidden
    macs += n * d * dh if d != dh else 0  # condition projection
    macs += n * c * dh  # head patch embedding
    macs += cfg.head_depth * _block_macs(n, dh, 3 * dh * swiglu_hidden(dh, cfg.mlp_ratio),
                                         cond_tokens=n)
    return macs + n * 2 * dh * dh + n * dh * c  # final adaLN (per token) and output linear


def model_flops_per_image(name: str | ModelConfig, in_channels: int, grid_size: int,
                          learn_sigma: bool | None = None, **overrides) -> float:
    """Forward FLOPs of one image, 2 x `model_macs`. A training step costs about 3x this
    (forward + backward)."""
    return 2.0 * model_macs(name, in_channels, grid_size, learn_sigma, **overrides)


def _block_macs(n: int, d: int, mlp_macs: int, cond_tokens: int) -> int:
    """One adaLN block over n tokens of width d; `mlp_macs` is its MLP's cost per token."""
    return (cond_tokens * d * 6 * d  # adaLN, once per sample (DiT) or per token (DiT-DH head)
            + n * d * 3 * d + n * d * d  # qkv and output projections
            + 2 * n * n * d  # QK^T and AV
            + n * mlp_macs)


@dataclass(frozen=True)
class ARConfig:
    """A scale-wise autoregressive generator: VAR, or HART = VAR + a residual diffusion head."""

    family: Literal["var", "hart"]
    depth: int
    width: int
    heads: int
    head_width: int = 0  # HART's residual head; 0 for VAR
    head_depth: int = 0


AR_MODELS: dict[str, ARConfig] = {
    # VAR's rule: width 64 x depth, heads = depth; HART's head is 6 blocks of width 1024
    **{f"VAR-d{d}": ARConfig("var", d, 64 * d, d) for d in (16, 20, 24, 30)},
    **{f"HART-d{d}": ARConfig("hart", d, 64 * d, d, head_width=1024, head_depth=6)
       for d in (20, 24, 30)},
    # ~1M parameters: a 32 px digit in a few CPU minutes; micro for seconds-long tests
    "VAR-tiny": ARConfig("var", 3, 128, 4),
    "VAR-micro": ARConfig("var", 2, 32, 2),
    "HART-tiny": ARConfig("hart", 3, 128, 4, head_width=128, head_depth=3),
    "HART-micro": ARConfig("hart", 2, 32, 2, head_width=32, head_depth=2),
}

def reference_tokenizer(name: str) -> tuple[int, int, tuple[int, ...], int]:
    """(vocab, channels, scales, classes) of the tokenizer an autoregressive model is sized on:
    rae_core.hybrid_vq's `var-vq` (ImageNet), `vq-tiny` or `vq-micro` (10 digit classes)."""
    from rae_core.hybrid_vq import tokenizer_config

    get_ar_config(name)
    size = next((s for s in ("tiny", "micro") if s in name), None)
    tok = tokenizer_config(f"vq-{size}" if size else "var-vq")
    return tok.vocab, tok.z_channels, tok.scales, 10 if size else 1000


def get_ar_config(name: str) -> ARConfig:
    if name not in AR_MODELS:
        close = difflib.get_close_matches(str(name), list(AR_MODELS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ModelConfigError(f"unknown autoregressive model {name!r}{hint} "
                               f"(valid: {', '.join(AR_MODELS)})")
    return AR_MODELS[name]


def build_ar_model(name: str, vocab: int, channels: int, scales: tuple[int, ...],
                   num_classes: int, label_dropout: float = 0.1) -> nn.Module:
    """A VAR (forward(labels, inputs) -> logits, hidden) or a HART (its `var` and
    `residual_head`) for a tokenizer of `vocab` codes of `channels` values at `scales`."""
    cfg = get_ar_config(name)
    var = VAR(vocab, channels, scales, cfg.depth, cfg.width, cfg.heads, num_classes,
              label_dropout=label_dropout)
    if cfg.family == "var":
        return var
    # imported here: the residual head lives in its own module, and rae_core.hart imports VAR
    from rae_core.hart import HART
    from rae_core.models.residual_head import ResidualHead

    return HART(var, ResidualHead(token_channels=channels, cond_channels=cfg.width,
                                  width=cfg.head_width, depth=cfg.head_depth))


def count_ar_params(name: str, vocab: int | None = None, channels: int | None = None,
                    scales: tuple[int, ...] | None = None, num_classes: int | None = None) -> int:
    """Trainable parameters without the tokenizer, counted on the meta device; unset arguments
    come from the model's reference tokenizer."""
    ref = reference_tokenizer(name)
    given = (vocab, channels, scales, num_classes)
    args = [r if g is None else g for g, r in zip(given, ref, strict=True)]
    with torch.device("meta"):
        model = build_ar_model(name, *args)
    return sum(p.numel() for p in model.parameters())

"""The one registry of named DiT / DiT-DH configurations, and how to build, size and cost them.

Paper models (DiT table widths; DiT-DH heads 2048 wide, 2 deep, 16 heads) plus `tiny` models
for a laptop CPU (64-channel 4x4 latent) and `micro` ones for seconds-long smoke tests.
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
from rae_core.models.ditdh import DiTDH


class ModelConfigError(ConfigError, ValueError):
    """An unknown model name, a bad override or a model narrower than its latent."""


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["dit", "ditdh"]
    hidden: int
    depth: int
    heads: int
    head_hidden: int = 0  # DiT-DH head; 0 for a plain DiT
    head_depth: int = 0
    head_heads: int = 0
    mlp_ratio: float = 4.0
    qk_norm: bool = False  # the reference's released configs leave it off
    label_std: float = 0.02  # class-table init; see LabelEmbedder

    @property
    def width(self) -> int:
        """The width the latent must pass through to be predicted: the head's for DiT-DH."""
        return self.head_hidden if self.family == "ditdh" else self.hidden


_BODIES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

MODELS: dict[str, ModelConfig] = {
    **{f"DiT-{k}": ModelConfig("dit", *v) for k, v in _BODIES.items()},
    **{f"DiTDH-{k}": ModelConfig("ditdh", *v, head_hidden=2048, head_depth=2, head_heads=16)
       for k, v in _BODIES.items()},
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
}


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
    parts = [("", cfg.hidden, cfg.depth, cfg.heads)]
    if cfg.family == "ditdh":
        parts.append(("head_", cfg.head_hidden, cfg.head_depth, cfg.head_heads))
    for prefix, hidden, depth, heads in parts:
        if min(hidden, depth, heads) < 1:
            raise ModelConfigError(f"{label}: {prefix}hidden, {prefix}depth and {prefix}heads "
                                   f"must be positive, got {hidden}, {depth}, {heads}")
        # 2D RoPE splits each head in two halves of rotation pairs; sin-cos likewise the width
        if hidden % heads or (hidden // heads) % 4:
            raise ModelConfigError(f"{label}: {prefix}hidden {hidden} must split into "
                                   f"{prefix}heads {heads} of a size divisible by 4 (2D RoPE)")


def check_width(name_or_config: str | ModelConfig, in_channels: int, **overrides) -> None:
    """Refuse a model narrower than the latent's channels (the RAE width rule)."""
    cfg = get_config(name_or_config, **overrides)
    if cfg.width < in_channels:
        raise ModelConfigError(
            f"hidden width {cfg.width} of {_label(name_or_config, overrides)} is below the "
            f"latent's {in_channels} channels: a DiT narrower than its latent cannot even fit "
            f"one sample (RAE width rule); pick a model with hidden >= {in_channels}")


def build_model(name: str | ModelConfig, in_channels: int, grid_size: int, num_classes: int,
                label_dropout: float = 0.1, allow_narrow: bool = False,
                **overrides) -> nn.Module:
    """A DiT or DiT-DH for (B, in_channels, grid_size, grid_size) latents; forward(x, t, y).

    `overrides` replace fields of the registered config (hidden, depth, heads, ...; None is
    ignored). A model narrower than the latent is refused unless `allow_narrow` (the width
    ablation builds such models on purpose).
    """
    cfg = get_config(name, **overrides)
    if not allow_narrow:
        check_width(name, in_channels, **overrides)
    common = dict(in_channels=in_channels, grid_size=grid_size, num_classes=num_classes,
                  hidden=cfg.hidden, depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                  qk_norm=cfg.qk_norm, label_dropout=label_dropout,
                  label_std=cfg.label_std)
    if cfg.family == "dit":
        return DiT(**common)
    return DiTDH(**common, head_hidden=cfg.head_hidden, head_depth=cfg.head_depth,
                 head_heads=cfg.head_heads)


def count_params(name: str | ModelConfig, in_channels: int = 768, grid_size: int = 16,
                 num_classes: int = 1000, **overrides) -> int:
    """Trainable parameters, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = build_model(name, in_channels, grid_size, num_classes, allow_narrow=True,
                            **overrides)
    return sum(p.numel() for p in model.parameters())


def model_flops_per_image(name: str | ModelConfig, in_channels: int, grid_size: int,
                          **overrides) -> float:
    """Forward FLOPs of one image: 2 x the multiply-accumulates of every matmul, attention's
    QK^T and AV included (norms, activations and the label lookup are left out).
    A training step costs about 3x this (forward + backward)."""
    cfg = get_config(name, **overrides)
    n, c = grid_size * grid_size, in_channels
    d = cfg.hidden
    macs = n * c * d  # patch embedding
    macs += 2 * 256 * d + d * d  # time embedding MLP (256 Fourier frequencies, sin and cos)
    macs += cfg.depth * _block_macs(n, d, cfg.mlp_ratio, cond_tokens=1)
    if cfg.family == "dit":
        macs += 2 * d * d + n * d * c  # final adaLN (per sample) and output linear
    else:
        dh = cfg.head_hidden
        macs += n * d * dh if d != dh else 0  # condition projection
        macs += n * c * dh  # head patch embedding
        macs += cfg.head_depth * _block_macs(n, dh, cfg.mlp_ratio, cond_tokens=n)
        macs += n * 2 * dh * dh + n * dh * c  # final adaLN (per token) and output linear
    return 2.0 * macs


def _block_macs(n: int, d: int, mlp_ratio: float, cond_tokens: int) -> int:
    h = swiglu_hidden(d, mlp_ratio)
    return (cond_tokens * d * 6 * d  # adaLN, once per sample (DiT) or per token (DiT-DH head)
            + n * d * 3 * d + n * d * d  # qkv and output projections
            + 2 * n * n * d  # QK^T and AV
            + n * d * 3 * h)  # SwiGLU: w12 (d -> 2h) and w3 (h -> d)

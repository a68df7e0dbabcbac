"""The generator as the stages use it, resolved from `generator.kind` in this one place.

- `flow`: flow matching (rae_core.transport) with the dimension-dependent time shift; sampled
  by Euler/Heun with CFG (on a time interval) or AutoGuidance (rae_core.sampling). RAE's recipe.
- `ddpm`: IDDPM Gaussian diffusion with learned variance (rae_core.diffusion); sampled by
  respaced DDPM or DDIM with CFG. DiT's recipe.
- `hart`: a VAR or HART (rae_core.hart) on a hybrid-vq tokenizer's latent: cross-entropy over
  every scale's tokens (+ the residual head's diffusion loss); sampled scale by scale with a KV
  cache and ramped CFG, then the residual head. It carries its frozen quantiser.
The training loop sees an objective with `sample_time(batch, generator)`,
`loss(model, x, y, noise=, t=)` and `terms` (its loss's parts, for the curves); the sample
stage, the preview grids and the FID curve call `sample_latents`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rae_core.config import Config

# The sections a trained generator depends on: checkpoints and outputs are keyed by them.
SECTIONS = ("data", "autoencoder", "encoder", "generator", "seed")


def latent_shift(cfg: Config, latent_shape: tuple[int, int, int]) -> float:
    """The flow's time shift: given, or sqrt(tokens x channels / base) of the latent."""
    from rae_core.transport import shift_factor

    if cfg.generator.shift is not None:
        return cfg.generator.shift
    c, h, w = latent_shape
    return shift_factor(h * w, c, cfg.generator.shift_base)


def build_generator(cfg: Config, latent_shape: tuple[int, int, int],
                    tokens: tuple[nn.Module, float] | None = None) -> nn.Module:
    """A fresh generator for the latent; `tokens` = (the tokenizer's quantiser, the residual
    scale) for generator.kind = hart."""
    from rae_core.models import build_model

    if cfg.generator.kind == "hart":
        return _scalewise(cfg.generator.model, *tokens, cfg.data.num_classes,
                          cfg.generator.label_dropout)
    c, h, _ = latent_shape
    return build_model(cfg.generator.model, in_channels=c, grid_size=h,
                       num_classes=cfg.data.num_classes,
                       label_dropout=cfg.generator.label_dropout, **cfg.generator.overrides())


def _scalewise(name: str, quantizer: nn.Module, residual_scale: float, num_classes: int,
               label_dropout: float = 0.0) -> nn.Module:
    from rae_core.hart import ScalewiseGenerator
    from rae_core.models.registry import build_ar_model

    model = build_ar_model(name, quantizer.vocab, quantizer.channels, quantizer.scales,
                           num_classes, label_dropout)
    return ScalewiseGenerator(model, quantizer, residual_scale)


def token_space(cfg: Config, paths, encoder: nn.Module) -> tuple[nn.Module, float] | None:
    """(a frozen copy of the tokenizer's quantiser, the residual scale) for generator.kind =
    hart, else None."""
    import copy

    from rae_core.autoencoder import residual_scale

    if cfg.generator.kind != "hart":
        return None
    return copy.deepcopy(encoder.quantizer).cpu(), residual_scale(cfg, paths, encoder)


def checkpoint_meta(model: nn.Module) -> dict:
    """What load_generator needs beside the weights to rebuild a scale-wise generator."""
    q = getattr(model, "quantizer", None)
    if q is None:
        return {}
    return {"tokens": {"vocab": q.vocab, "channels": q.channels, "scales": list(q.scales),
                       "beta": q.beta}}


def load_generator(path: Path, latent_shape, num_classes: int) -> nn.Module:
    """An EMA checkpoint ({'model', 'name', 'overrides'}; a scale-wise one also 'tokens') as an
    eval-mode model; also AutoGuidance's weak model."""
    from rae_core.models import build_model
    from rae_core.store import safe_load

    state = safe_load(path)
    if "tokens" in state:
        from rae_core.quantize import MultiScaleQuantizer

        t = state["tokens"]
        quantizer = MultiScaleQuantizer(t["vocab"], t["channels"], tuple(t["scales"]), t["beta"])
        model = _scalewise(state["name"], quantizer, 1.0, num_classes)
        model.load_state_dict(state["model"])
        return model.eval()
    c, h, _ = latent_shape
    model = build_model(state["name"], in_channels=c, grid_size=h, num_classes=num_classes,
                        allow_narrow=True, **state.get("overrides", {}))
    model.load_state_dict(state["model"])
    return model.eval()


class DiffusionObjective:
    """IDDPM's training loss behind the interface the training loop drives."""

    def __init__(self, diffusion):
        self.diffusion = diffusion

    def sample_time(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.diffusion.sample_timesteps(batch, generator=generator)  # (B,) integers

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             noise: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.diffusion.training_loss(model, x, y, t=t, noise=noise)


def diffusion():
    """DiT's diffusion: 1000 linear betas from 1e-4 to 0.02."""
    from rae_core.diffusion import GaussianDiffusion

    return GaussianDiffusion()


class ScalewiseObjective:
    """VAR's cross-entropy (+ HART's residual loss) behind the same interface: no diffusion
    time or noise of its own (the head draws its own), the loss's parts kept in `terms`."""

    def __init__(self, residual_weight: float, mask_ratio: tuple[float, float]):
        self.residual_weight, self.mask_ratio = residual_weight, tuple(mask_ratio)
        self.terms: dict[str, float] = {}

    def sample_time(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.zeros(batch, dtype=torch.long)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             noise: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
        out = model(x, y, self.residual_weight, self.mask_ratio)
        self.terms = {k: v.detach() for k, v in out.items() if k != "total"}
        return out["total"]


def objective(cfg: Config, latent_shape: tuple[int, int, int]):
    """What train-generator minimises for this configuration."""
    if cfg.generator.kind == "hart":
        return ScalewiseObjective(cfg.generator.residual_weight, cfg.generator.mask_ratio)
    if cfg.generator.kind == "ddpm":
        return DiffusionObjective(diffusion())
    from rae_core.transport import Transport

    return Transport(time_dist=cfg.generator.time_dist, shift=latent_shift(cfg, latent_shape))


@torch.no_grad()
def sample_latents(cfg: Config, model: nn.Module, y: torch.Tensor,
                   latent_shape: tuple[int, int, int], noise: torch.Tensor,
                   guidance: str | None = None, weak_model: nn.Module | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised latents (B, C, H, W) for labels y from the given starting noise, with the
    sampler, steps and guidance of `cfg.sample` (`guidance` overrides the latter). DDPM's
    ancestral steps draw fresh noise from `generator`; the flow's ODE draws none."""
    s = cfg.sample
    guidance = s.guidance if guidance is None else guidance
    if cfg.generator.kind == "hart":
        # the token draws run on the model's device, seeded from `generator`
        seed = None if generator is None else \
            int(torch.randint(2 ** 62, (1,), generator=generator))
        draws = None if seed is None else torch.Generator(y.device).manual_seed(seed)
        return model.generate(y, s.scale if guidance == "cfg" else 0.0, s.top_k, s.top_p,
                              residual=s.residual, residual_steps=s.steps, generator=draws)
    if cfg.generator.kind == "ddpm":
        from rae_core.diffusion import generate

        return generate(model, y, latent_shape, diffusion(), steps=s.steps, method=s.sampler,
                        guidance=guidance, scale=s.scale, cfg_channels=s.cfg_channels,
                        noise=noise, generator=generator)
    from rae_core.sampling import generate

    return generate(model, y, latent_shape, steps=s.steps, method=s.sampler,
                    shift=latent_shift(cfg, latent_shape), guidance=guidance, scale=s.scale,
                    interval=tuple(s.interval), weak_model=weak_model, noise=noise)

"""The generator as the stages use it, resolved from `generator.kind` in this one place.

- `flow`: flow matching (rae_core.transport) with the dimension-dependent time shift; sampled
  by Euler/Heun with CFG (on a time interval) or AutoGuidance (rae_core.sampling). RAE's recipe.
- `ddpm`: IDDPM Gaussian diffusion with learned variance (rae_core.diffusion); sampled by
  respaced DDPM or DDIM with CFG. DiT's recipe.
The training loop sees an objective with `sample_time(batch, generator)` and
`loss(model, x, y, noise=, t=)`; the sample stage, the preview grids and the FID curve call
`sample_latents`.
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


def build_generator(cfg: Config, latent_shape: tuple[int, int, int]) -> nn.Module:
    from rae_core.models import build_model

    c, h, _ = latent_shape
    return build_model(cfg.generator.model, in_channels=c, grid_size=h,
                       num_classes=cfg.data.num_classes,
                       label_dropout=cfg.generator.label_dropout, **cfg.generator.overrides())


def load_generator(path: Path, latent_shape, num_classes: int) -> nn.Module:
    """An EMA checkpoint ({'model', 'name', 'overrides'}) as an eval-mode model; also
    AutoGuidance's weak model."""
    from rae_core.models import build_model
    from rae_core.train.common import safe_load

    state = safe_load(path)
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


def objective(cfg: Config, latent_shape: tuple[int, int, int]):
    """What train-generator minimises for this configuration."""
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
    if cfg.generator.kind == "ddpm":
        from rae_core.diffusion import generate

        return generate(model, y, latent_shape, diffusion(), steps=s.steps, method=s.sampler,
                        guidance=guidance, scale=s.scale, cfg_channels=s.cfg_channels,
                        noise=noise, generator=generator)
    from rae_core.sampling import generate

    return generate(model, y, latent_shape, steps=s.steps, method=s.sampler,
                    shift=latent_shift(cfg, latent_shape), guidance=guidance, scale=s.scale,
                    interval=tuple(s.interval), weak_model=weak_model, noise=noise)

"""Flow matching on RAE latents (rectified flow, velocity prediction).

Time convention: t = 0 is DATA and t = 1 is NOISE (the reverse of SiT, where t = 1 is data):
    x_t = (1 - t) x + t eps,        velocity u = dx_t/dt = eps - x.
Sampling therefore integrates from t = 1 down to t = 0 (see rae_core.sampling).

High-dimensional latents stay recognisable at noise levels that would erase a small latent, so
training times are pushed towards the noise end by the dimension-dependent shift
    t' = s t / (1 + (s - 1) t),     s = sqrt(N / base), N = tokens x channels, base = 4096
(s ~ 6.93 for a 16 x 16 x 768 DINOv2-B latent at 256 px, ~ 13.86 at 512 px).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn


def shift_factor(num_tokens: int, channels: int, base: float = 4096) -> float:
    return math.sqrt(num_tokens * channels / base)


def shift_time(t: torch.Tensor, s: float) -> torch.Tensor:
    """Monotone map of [0, 1] onto itself fixing 0 and 1; s > 1 moves times towards noise."""
    return s * t / (1 + (s - 1) * t)


def randn_on_generator(shape: tuple[int, ...], device: torch.device | str,
           generator: torch.Generator | None) -> torch.Tensor:
    """Normal draws, taken on the generator's device (so a CPU generator drives GPU runs)."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class Transport:
    def __init__(self, time_dist: Literal["logit_normal", "uniform"] = "logit_normal",
                 shift: float = 1.0, t_max: float = 0.999):
        if time_dist not in ("logit_normal", "uniform"):
            raise ValueError(f"time_dist {time_dist!r} is not one of logit_normal, uniform")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.time_dist, self.shift, self.t_max = time_dist, shift, t_max

    def sample_time(self, batch: int, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch,) training times: logit-normal(0, 1) or uniform, clipped to [0, t_max],
        then shifted."""
        if self.time_dist == "logit_normal":
            t = torch.sigmoid(randn_on_generator((batch,), device, generator))
        elif generator is None:
            t = torch.rand(batch, device=device)
        else:
            t = torch.rand(batch, generator=generator, device=generator.device).to(device)
        return shift_time(t.clamp(0.0, self.t_max), self.shift)

    @staticmethod
    def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
        return (1 - t) * x + t * noise

    @staticmethod
    def target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
             t: torch.Tensor | None = None) -> torch.Tensor:
        """Plain MSE between model(x_t, t, y) and the velocity, averaged over all dims.

        `noise` and `t` may be drawn by the caller (for the whole batch before it is split
        into accumulation micro-batches, so that accumulation does not change the draws)."""
        if noise is None:
            noise = randn_on_generator(tuple(x.shape), x.device, generator).to(x.dtype)
        if t is None:
            t = self.sample_time(x.shape[0], x.device, generator)
        pred = model(self.interpolate(x, noise, t), t, y)
        return (pred.float() - self.target(x, noise).float()).pow(2).mean()

"""ODE sampling of the flow-matching generators, with classifier-free and AutoGuidance.

Time runs from t = 1 (noise) down to t = 0 (data), as in rae_core.transport. A velocity
function maps (x (B, C, H, W), t (B,)) to dx/dt; the wrappers below turn a model (and its
guidance) into one.

The grid is the reference's shift(1 - linspace(0, 0.999, steps)), which stops at
shift(0.001) > 0, followed by one last step to exactly t = 0: `steps` points, `steps`
intervals, so Euler costs `steps` model evaluations and Heun 2 x `steps` (the velocity field
is finite at t = 0, so Heun's correction is applied on the last interval too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from rae_core.transport import shift_time

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) decreasing times from 1 to 0 (float64)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = shift_time(1 - torch.linspace(0, 0.999, steps, dtype=torch.float64), shift)
    return torch.cat([t, t.new_zeros(1)])


def sample(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int = 50,
           method: Literal["euler", "heun"] = "euler", shift: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = velocity_fn(x, t) from x(1) = noise to t = 0; returns x(0)."""
    if method not in ("euler", "heun"):
        raise ValueError(f"method {method!r} is not one of euler, heun")
    ts = time_grid(steps, shift).tolist()
    x = noise

    t_dtype = torch.promote_types(x.dtype, torch.float32)  # never a half-precision time

    def at(t: float) -> torch.Tensor:
        return torch.full((x.shape[0],), t, dtype=t_dtype, device=x.device)  # (B,)

    for t_cur, t_next in zip(ts[:-1], ts[1:], strict=True):
        dt = t_next - t_cur  # negative: towards data
        v = velocity_fn(x, at(t_cur))
        if method == "euler":
            x = x + dt * v
        else:
            v_next = velocity_fn(x + dt * v, at(t_next))
            x = x + dt * 0.5 * (v + v_next)
    return x


def conditional_velocity(model: nn.Module, y: torch.Tensor) -> VelocityFn:
    return lambda x, t: model(x, t, y)


def cfg_velocity(model: nn.Module, y: torch.Tensor, scale: float,
                 interval: Sequence[float] = (0.0, 1.0),
                 num_classes: int | None = None) -> VelocityFn:
    """Classifier-free guidance v_u + w (v_c - v_u) on all channels, for t in [lo, hi]
    (inclusive); plain conditional v_c elsewhere. One batched pass computes both."""
    lo, hi = interval
    null = torch.full_like(y, model.num_classes if num_classes is None else num_classes)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside = (t >= lo) & (t <= hi)  # (B,)
        if not inside.any():
            return model(x, t, y)  # outside the interval the unconditional pass is not needed
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        v_c, v_u = v.chunk(2)
        guided = v_u + scale * (v_c - v_u)
        return torch.where(inside.view(-1, *([1] * (x.dim() - 1))), guided, v_c)

    return velocity


def autoguidance_velocity(good_model: nn.Module, bad_model: nn.Module, y: torch.Tensor,
                          scale: float) -> VelocityFn:
    """AutoGuidance: v_bad + w (v_good - v_bad), both conditional; the bad model is a smaller
    or less trained version of the good one."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_bad = bad_model(x, t, y)
        return v_bad + scale * (good_model(x, t, y) - v_bad)

    return velocity


def balanced_labels(num_per_class: int, num_classes: int) -> torch.Tensor:
    """(num_per_class * num_classes,) labels, class-major: 0,0,...,1,1,..."""
    return torch.arange(num_classes).repeat_interleave(num_per_class)


@torch.no_grad()
def generate(model: nn.Module, y: torch.Tensor, latent_shape: Sequence[int], steps: int = 50,
             method: Literal["euler", "heun"] = "euler", shift: float = 1.0,
             guidance: Literal["none", "cfg", "autoguidance"] = "none", scale: float = 1.0,
             interval: Sequence[float] = (0.0, 1.0), weak_model: nn.Module | None = None,
             generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """Latents (B, C, H, W) for labels y (B,), on the model's device.

    Models run in eval mode (no label dropout) and are put back in their previous mode.
    Noise is drawn on the generator's device, so a CPU generator gives the same samples on
    any device; or it is given (drawn once per shard, so batching does not change it).
    """
    device = next(model.parameters()).device
    y = y.to(device)
    if guidance == "none":
        velocity = conditional_velocity(model, y)
    elif guidance == "cfg":
        velocity = cfg_velocity(model, y, scale, interval)
    elif guidance == "autoguidance":
        if weak_model is None:
            raise ValueError("guidance 'autoguidance' needs a weak_model")
        velocity = autoguidance_velocity(model, weak_model, y, scale)
    else:
        raise ValueError(f"guidance {guidance!r} is not one of none, cfg, autoguidance")
    if noise is None:
        shape = (y.shape[0], *latent_shape)
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=gen_device)
    noise = noise.to(device)
    models = [m for m in (model, weak_model) if m is not None]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        return sample(velocity, noise, steps, method, shift)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)

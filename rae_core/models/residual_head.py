"""HART's residual diffusion head (MAR's SimpleMLPAdaLN): one token's continuous residual,
denoised by an MLP.

Per token, x_t (C,) -> Linear(C, W) -> `depth` residual blocks at width W, each LayerNorm ->
adaLN shift and scale -> Linear-SiLU-Linear -> adaLN gate, the three vectors from
SiLU -> Linear(W, 3W) of y = Linear(z) + the step's sinusoidal embedding (256 features -> MLP),
where z (cond_channels) is the AR transformer's output at the token; a final adaLN (shift,
scale) + Linear(W, 2C) gives C channels of epsilon and C of the learned-variance interpolation
v (rae_core.diffusion). HART: W = 1024, depth 6, C = 32 latent channels.

The diffusion is IDDPM's: a 1000-step cosine schedule trained with the hybrid loss
(`residual_loss`), sampled on the same schedule respaced to 8 steps (`sample_residual`).
"""

from __future__ import annotations

import torch
from torch import nn

from rae_core.diffusion import GaussianDiffusion, cosine_betas, sample
from rae_core.models.blocks import AdaLN, modulate, xavier_linear, zero_linear
from rae_core.models.dit_ddpm import SinusoidalTimestepEmbedder, layer_norm
from rae_core.transport import randn_on_generator


class ResBlock(nn.Module):
    """LayerNorm -> adaLN shift/scale -> Linear-SiLU-Linear, gated into the residual stream."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)  # MAR keeps this one's affine parameters
        self.mlp = nn.Sequential(xavier_linear(nn.Linear(width, width)), nn.SiLU(),
                                 xavier_linear(nn.Linear(width, width)))
        self.ada = AdaLN(width, width, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(y)  # each (N, W)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class ResidualHead(nn.Module):
    """forward(x_t (N, C), t (N,) diffusion steps 0..999, cond (N, cond_channels)) -> (N, 2C).

    Zero-initialised as MAR does: every block's adaLN (so each block starts as the identity
    and the deep MLP trains from a stable start), the final adaLN and the final Linear, whose
    zero weight and bias alone make the first output exactly 0: epsilon 0 and v = 0, a
    variance halfway (in log space) between beta-tilde and beta.
    """

    def __init__(self, token_channels: int, cond_channels: int, width: int = 1024,
                 depth: int = 6):
        super().__init__()
        self.token_channels = token_channels
        self.input_proj = xavier_linear(nn.Linear(token_channels, width))
        self.time_embed = SinusoidalTimestepEmbedder(width)
        self.cond_embed = xavier_linear(nn.Linear(cond_channels, width))
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_norm = layer_norm(width)
        self.final_ada = AdaLN(width, width, 2)
        self.final = zero_linear(nn.Linear(width, 2 * token_channels))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(t) + self.cond_embed(cond)  # (N, W)
        h = self.input_proj(x_t)  # (N, W)
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.final_ada(y)
        return self.final(modulate(self.final_norm(h), shift, scale))  # (N, 2C)


def residual_diffusion() -> GaussianDiffusion:
    """The training diffusion of MAR and HART: 1000 cosine steps (learned sigma is the head's)."""
    return GaussianDiffusion(cosine_betas(1000))


def residual_loss(head: ResidualHead, diffusion: GaussianDiffusion, target: torch.Tensor,
                  cond: torch.Tensor, mask: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """IDDPM's hybrid loss of `head` on residual tokens target (N, C) given cond (N, D),
    averaged over the rows where mask (N,) is True, or over all rows when it is None.

    MAR-style masking: at HART's last scale a random 50-100 % of the tokens are masked, and
    only their residuals (mask True) are trained, as MAR trains its head only on the tokens it
    hid from its encoder. Unmasked rows are dropped before the head runs, so they cost nothing
    (MAR weights them by 0 instead, with the same mean).
    """
    if mask is not None:
        if not mask.any():
            raise ValueError("residual_loss: the mask selects no rows")
        target, cond = target[mask], cond[mask]
    return diffusion.training_loss(head, target, cond, generator=generator)


@torch.no_grad()
def sample_residual(head: ResidualHead, cond: torch.Tensor, steps: int = 8,
                    temperature: float = 1.0, generator: torch.Generator | None = None,
                    diffusion: GaussianDiffusion | None = None) -> torch.Tensor:
    """(N, C) residuals for cond (N, D): ancestral sampling over `diffusion` (default: the
    1000-step cosine one) respaced to `steps`, the step noise scaled by `temperature`.

    The predicted x_0 is clipped to [-1, 1] at every step, as HART's sampler does: over 8
    cosine steps the first one has alpha = 1 - beta ~ 5e-8, so an unclipped mean would carry
    the epsilon error times 1 / sqrt(alpha) ~ 4500. The targets must therefore lie in [-1, 1]:
    HART trains on residual / 0.6; that scale is the caller's.
    """
    respaced = (diffusion or residual_diffusion()).respaced(steps)
    noise = randn_on_generator((cond.shape[0], head.token_channels), cond.device, generator)
    return sample(lambda x, t: head(x, t, cond), noise, respaced, "ddpm", generator=generator,
                  clip_denoised=True, temperature=temperature)

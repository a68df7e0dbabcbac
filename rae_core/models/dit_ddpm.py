"""DiT as Peebles & Xie built it: the epsilon-predicting generator of the DiT paper.

A p x p conv of stride p cuts the latent (B, C, H, W) into (H/p)^2 tokens of width D, plus a
fixed 2D sin-cos position embedding. Each block is pre-LayerNorm (no affine) multi-head
attention and a GELU(tanh) MLP of 4D, both shifted, scaled and gated by adaLN-Zero from
c = t_emb + y_emb, where t is a diffusion step (0..999, float or integer) embedded by 256
sinusoidal features and an MLP. A final adaLN (shift, scale) + Linear gives p*p*out_C values per
token, unpatchified to (B, out_C, H, W): with learn_sigma, C channels of epsilon, then C of the
variance interpolation v in [-1, 1] (see rae_core.diffusion).

Against the flow models of dit.py: LayerNorm not RMSNorm, GELU not SwiGLU, no RoPE, a conv patch
embedding, sinusoidal rather than Gaussian-Fourier time features of a step rather than t in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rae_core.models.blocks import (
    AdaLN,
    Attention,
    LabelEmbedder,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
    xavier_linear,
    zero_linear,
)


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # adaLN supplies scale and shift


class SinusoidalTimestepEmbedder(nn.Module):
    """t -> [cos, sin](t f) over 128 frequencies f from 1 down to 1/10000 -> MLP."""

    def __init__(self, dim: int, num_feats: int = 256, max_period: float = 10000.0):
        super().__init__()
        half = num_feats // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)  # fixed, so not checkpointed
        self.mlp = nn.Sequential(nn.Linear(num_feats, dim), nn.SiLU(), nn.Linear(dim, dim))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        ang = t.float()[:, None] * self.freqs[None, :]  # (B, 128)
        feats = torch.cat([ang.cos(), ang.sin()], dim=-1)  # (B, 256)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (B, D)


class DiTBlock(nn.Module):
    """The original DiT block: LayerNorm, attention, GELU MLP, adaLN-Zero (6 vectors)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, heads)  # qkv with bias, no RoPE
        self.norm2 = layer_norm(dim)
        self.mlp = nn.Sequential(xavier_linear(nn.Linear(dim, hidden)), nn.GELU(approximate="tanh"),
                                 xavier_linear(nn.Linear(hidden, dim)))
        self.ada = AdaLN(dim, dim, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D); c: (B, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiTFinalLayer(nn.Module):
    """LayerNorm + adaLN shift/scale + Linear to a patch's output values, all zero-init."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = layer_norm(dim)
        self.ada = AdaLN(dim, dim, 2)
        self.linear = zero_linear(nn.Linear(dim, out_dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*out_C)


class DiTDDPM(nn.Module):
    def __init__(self, in_channels: int, grid_size: int, num_classes: int, hidden: int,
                 depth: int, heads: int, patch: int = 2, mlp_ratio: float = 4.0,
                 label_dropout: float = 0.1, label_std: float = 0.02, learn_sigma: bool = True):
        super().__init__()
        self.in_channels, self.grid_size, self.num_classes = in_channels, grid_size, num_classes
        self.patch, self.learn_sigma = patch, learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embed = nn.Conv2d(in_channels, hidden, patch, stride=patch)
        # initialised as the Linear over a flattened patch that the conv is
        nn.init.xavier_uniform_(self.x_embed.weight.view(hidden, -1))
        nn.init.zeros_(self.x_embed.bias)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, grid_size // patch),
                             persistent=False)
        self.t_embed = SinusoidalTimestepEmbedder(hidden)
        self.y_embed = LabelEmbedder(num_classes, hidden, label_dropout, label_std)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final = DiTFinalLayer(hidden, patch * patch * self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) at step t (B,) with labels y (B,) -> (B, out_C, H, W): epsilon, then
        the variance interpolation when learn_sigma."""
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D), N = (H/p)^2
        c = (self.t_embed(t) + self.y_embed(y, force_drop_ids))[:, None]  # (B, 1, D)
        for block in self.blocks:
            h = block(h, c)
        return unpatchify(self.final(h, c), self.patch, self.grid_size)  # (B, out_C, H, W)

"""Building blocks shared by DiT and DiT-DH (LightningDiT-style), some also by DiT-DDPM.

RMSNorm, SwiGLU, axial 2D RoPE, attention, adaLN-Zero blocks, the time / label embedders and
patchify / unpatchify. A condition `c` is either per sample, shape (B, 1, D), or per token,
shape (B, N, D); every adaLN modulation broadcasts over the token axis, so one block serves
both cases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def xavier_linear(linear: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def zero_linear(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): one token per p x p square, row-major, channels last."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), -1)


def unpatchify(tokens: torch.Tensor, patch: int, grid_size: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W) with H = W = grid_size; the inverse of `patchify`."""
    B, g = tokens.shape[0], grid_size // patch
    x = tokens.reshape(B, g, g, patch, patch, -1)  # (B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, grid_size, grid_size)


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLU width: 2/3 of the plain MLP's, so both have the same parameter count.

    Evaluated exactly as the reference does (no rounding to a multiple), which is what the
    published parameter counts imply.
    """
    return int(2 / 3 * int(dim * mlp_ratio))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: bf16 sums of squares lose too much precision
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = xavier_linear(nn.Linear(dim, 2 * hidden))  # gate and value in one matmul
        self.w3 = xavier_linear(nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class RoPE2D(nn.Module):
    """Axial 2D rotary embedding: the first half of each head rotates with the token's row,
    the second half with its column (rotation pairs are adjacent channels)."""

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        axis_dim = head_dim // 2
        freqs = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim)
        pos = torch.arange(grid_size, dtype=torch.float32)
        ang = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # (G, axis_dim)
        g = grid_size
        rows = ang[:, None, :].expand(g, g, axis_dim)
        cols = ang[None, :, :].expand(g, g, axis_dim)
        ang = torch.cat([rows, cols], dim=-1).reshape(g * g, head_dim)  # (N, head_dim)
        # deterministic, so not saved in checkpoints
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, heads, N, head_dim)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)  # each pair (a, b) -> (-b, a)
        return x * self.cos + rotated * self.sin


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = xavier_linear(nn.Linear(dim, 3 * dim))
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = xavier_linear(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, rope: RoPE2D | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            # the fp32 rotary tables promote q, k under autocast; SDPA needs one dtype
            q, k = rope(q).to(v.dtype), rope(k).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLN(nn.Module):
    """SiLU -> Linear(D, n * D), split into n modulation vectors.

    Zero-initialised (adaLN-Zero): all shifts, scales and gates start at 0, so every residual
    block starts as the identity and the final layer outputs exactly 0.
    """

    def __init__(self, cond_dim: int, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = zero_linear(nn.Linear(cond_dim, n * dim))

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.n, dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm + adaLN-Zero (6 vectors), RoPE attention, SwiGLU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        self.ada = AdaLN(dim, dim, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RoPE2D | None) -> torch.Tensor:
        # x: (B, N, D); c: (B, 1, D) per sample or (B, N, D) per token
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """RMSNorm + adaLN shift/scale (no gate) + Linear to the latent channels, all zero-init."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.ada = AdaLN(dim, dim, 2)
        self.linear = zero_linear(nn.Linear(dim, out_channels))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, C)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> fixed Gaussian Fourier features [sin, cos](2 pi t W) -> MLP."""

    def __init__(self, dim: int, num_freqs: int = 256, scale: float = 1.0):
        super().__init__()
        # random but fixed: a buffer (saved with the model), never trained
        self.register_buffer("freqs", torch.randn(num_freqs) * scale)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        ang = 2 * math.pi * t.float()[:, None] * self.freqs[None, :]  # (B, num_freqs)
        feats = torch.cat([ang.sin(), ang.cos()], dim=-1)  # (B, 2 * num_freqs)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class table with one extra row, index num_classes = the null (unconditional) class.

    In training mode labels are replaced by the null class with probability `dropout`
    (classifier-free guidance); `force_drop_ids` (B,) drops exactly where it is nonzero.
    `init_std` is DiT's 0.02 for the paper models; short runs use a unit-scale table, whose
    rows reach the zero-initialised adaLN layers at full strength from the first step.
    """

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.1, init_std: float = 0.02):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=init_std)

    def forward(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            drop = force_drop_ids.bool()
        elif self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout
        else:
            return self.table(y)
        return self.table(torch.where(drop, self.num_classes, y))  # (B, D)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (N, dim): half the channels encode the row,
    half the column; each half is [sin, cos] over geometric frequencies."""
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    ang = torch.outer(pos, omega)  # (G, dim/4)
    axis = torch.cat([ang.sin(), ang.cos()], dim=-1)  # (G, dim/2)
    g = grid_size
    rows = axis[:, None, :].expand(g, g, dim // 2)
    cols = axis[None, :, :].expand(g, g, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(g * g, dim).float()

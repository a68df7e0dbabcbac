"""The RAE decoder: an MAE-style ViT mapping a latent grid (B, C, h, w) to pixels (B, 3, h*p, w*p).

Linear(C -> D) per token, a learned CLS token, fixed 2D sin-cos position embedding, L pre-norm
ViT blocks, a final LayerNorm and Linear(D -> p*p*3); CLS is dropped and the patches are
unpatchified, optionally followed by a small residual convolution across the patch edges
(Refine; not in the paper). The prediction lives in the encoder's normalised pixel space and is
mapped back to [0, 1]-space with the encoder's mean/std (no clamp, so training sees the true
error).

During training only, the decoder sees noise-augmented latents z + sigma * eps (one sigma per
sample), which makes it robust to the imperfect latents a diffusion model generates.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rae_core.errors import ConfigError
from rae_core.train.sampler import per_sample

NoiseLaw = Literal["paper", "reference"]


@dataclass(frozen=True)
class DecoderSpec:
    width: int
    depth: int
    heads: int
    mlp_dim: int


DECODERS: dict[str, DecoderSpec] = {
    "ViT-B": DecoderSpec(768, 12, 12, 3072),  # ~86M
    "ViT-L": DecoderSpec(1024, 24, 16, 4096),  # ~304M
    "ViT-XL": DecoderSpec(1152, 28, 16, 4096),  # ~415M, the released default
    "ViT-tiny": DecoderSpec(128, 4, 4, 512),  # 64 x 4 x 4 latents -> 32 px with patch 8
    "ViT-micro": DecoderSpec(64, 2, 4, 256),  # seconds-long smoke runs
}


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed MAE-style 2D position embedding (grid*grid, dim): half the channels encode the row,
    half the column, each as sin/cos at geometrically spaced frequencies."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for pos in (rows, cols):
        angles = pos.reshape(-1, 1) * omega  # (grid*grid, dim/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class Block(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, ln_eps: float = 1e-6) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d_head)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


def init_vit_weights(module: nn.Module) -> None:
    """MAE initialisation: Xavier-uniform linear weights, zero biases (apply with Module.apply)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Refine(nn.Module):
    """x + conv(GELU(conv(x))) on the unpatchified image (B, 3, H, W): the linear head paints each
    patch from its own token alone, so only a convolution across patch edges lets neighbours
    agree there."""

    def __init__(self, channels: int, kernel: int = 3) -> None:
        super().__init__()
        self.inner = nn.Conv2d(3, channels, kernel, padding=kernel // 2)
        self.outer = nn.Conv2d(channels, 3, kernel, padding=kernel // 2)
        # Zero-initialise the outer conv (as DiT zeroes its adaLN and output layers): the block
        # starts as the identity, i.e. as the plain ViT decoder, and learns only a correction.
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.outer(F.gelu(self.inner(x)))  # (B, 3, H, W)


class ViTDecoder(nn.Module):
    def __init__(self, latent_channels: int, grid_size: int, patch_size: int, width: int,
                 depth: int, heads: int, mlp_dim: int,
                 pixel_mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 noise_tau: float = 0.0, noise_law: NoiseLaw = "paper",
                 refine_channels: int = 0, refine_kernel: int = 3,
                 ln_eps: float = 1e-6) -> None:
        super().__init__()
        if noise_law not in ("paper", "reference"):
            raise ConfigError(f"decoder.noise_law = {noise_law!r}; valid: 'paper', 'reference'")
        if noise_tau < 0:
            raise ConfigError(f"decoder.noise_tau = {noise_tau}; it must be >= 0")
        self.latent_shape = (latent_channels, grid_size, grid_size)
        self.patch_size = patch_size
        self.image_size = grid_size * patch_size
        self.noise_tau, self.noise_law = noise_tau, noise_law
        self.embed = nn.Linear(latent_channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        # CLS gets a zero position; the table is fixed, so it is a buffer rebuilt at construction.
        pos = torch.cat([torch.zeros(1, width), sincos_pos_embed_2d(width, grid_size)])
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # (1, 1+N, D)
        # ln_eps: the released reference decoders were trained with HF ViT-MAE's 1e-12
        self.blocks = nn.ModuleList(Block(width, heads, mlp_dim, ln_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=ln_eps)
        self.head = nn.Linear(width, patch_size * patch_size * 3)
        self.refine = Refine(refine_channels, refine_kernel) if refine_channels else None
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1),
                             persistent=False)
        self.apply(init_vit_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    @property
    def last_layer_weight(self) -> Tensor:
        """The output projection's weight (p*p*3, D): where the adaptive GAN weight is measured."""
        return self.head.weight

    def noise_augment(self, z: Tensor, generator=None) -> Tensor:
        """z + sigma * eps, one sigma per sample: |N(0, tau^2)| (paper) or tau * U(0, 1)
        (reference code). With a generator (or a BatchDraws) drawn on the CPU, else on z's
        device from the global generator."""
        b = z.shape[0]
        if generator is None:
            sigma = torch.randn(b, device=z.device).abs() if self.noise_law == "paper" else \
                torch.rand(b, device=z.device)
            eps = torch.randn_like(z)
        else:
            law = torch.randn if self.noise_law == "paper" else torch.rand
            sigma = per_sample(generator, b, lambda m, g: law(m, generator=g)).abs().to(z.device)
            eps = per_sample(generator, b, lambda m, g: torch.randn(m, *z.shape[1:], generator=g))
        sigma = sigma * self.noise_tau
        return z + sigma.to(z.dtype).view(b, 1, 1, 1) * eps.to(z.device, z.dtype)

    def forward(self, z: Tensor, generator=None) -> Tensor:
        """Raw (unnormalised) latents (B, C, h, w) -> images (B, 3, h*p, w*p) in [0, 1]-space."""
        if z.shape[1:] != self.latent_shape:
            raise ValueError(f"decoder expects latents of shape {self.latent_shape}, "
                             f"got {tuple(z.shape[1:])}")
        if self.training and self.noise_tau > 0:
            z = self.noise_augment(z, generator)
        b, _, h, w = z.shape
        x = self.embed(z.flatten(2).transpose(1, 2))  # (B, N, D)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.head(self.norm(x))[:, 1:]  # (B, N, p*p*3), CLS dropped
        x = F.pixel_shuffle(x.transpose(1, 2).reshape(b, -1, h, w), self.patch_size)
        if self.refine is not None:
            x = self.refine(x)
        return x * self.pixel_std + self.pixel_mean  # (B, 3, h*p, w*p)


def _spec(name: str) -> DecoderSpec:
    if name not in DECODERS:
        close = difflib.get_close_matches(name, DECODERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown decoder {name!r}{hint}; valid: {', '.join(DECODERS)}")
    return DECODERS[name]


def build_decoder(name: str, latent_channels: int, grid_size: int, patch_size: int,
                  pixel_mean: tuple[float, float, float], pixel_std: tuple[float, float, float],
                  noise_tau: float = 0.0, noise_law: NoiseLaw = "paper",
                  refine_channels: int = 0, refine_kernel: int = 3,
                  **overrides: int) -> ViTDecoder:
    """`overrides` replace the registered width (the MLP stays 4x it), depth or heads."""
    s = _spec(name)
    if overrides:
        width = overrides.get("width", s.width)
        s = replace(s, mlp_dim=4 * width if "width" in overrides else s.mlp_dim, **overrides)
    return ViTDecoder(latent_channels, grid_size, patch_size, s.width, s.depth, s.heads,
                      s.mlp_dim, tuple(pixel_mean), tuple(pixel_std), noise_tau, noise_law,
                      refine_channels, refine_kernel)


def decoder_param_count(name: str, latent_channels: int = 768, grid_size: int = 16,
                        patch_size: int = 16) -> int:
    """Trainable parameters of a registered decoder, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_decoder(name, latent_channels, grid_size, patch_size,
                              (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return sum(p.numel() for p in model.parameters())

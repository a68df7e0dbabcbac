"""DiT on RAE latents, LightningDiT-style.

Patch size 1: every latent position (a C-dim encoder token) is one transformer token, embedded by
a Linear C -> D. Fixed 2D sin-cos position embedding plus 2D RoPE in every attention;
RMSNorm, SwiGLU, adaLN-Zero conditioned on c = t_emb + y_emb (the SiLU sits in front of each
adaLN linear, so every block sees SiLU(t_emb + y_emb)). Predicts the flow-matching velocity.
"""

from __future__ import annotations

import torch
from torch import nn

from rae_core.models.blocks import (
    Block,
    FinalLayer,
    LabelEmbedder,
    RoPE2D,
    TimestepEmbedder,
    sincos_pos_embed_2d,
    xavier_linear,
)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


def to_latent(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    B, N, C = tokens.shape
    return tokens.transpose(1, 2).reshape(B, C, grid_size, grid_size)  # (B, C, H, W)


class DiTBody(nn.Module):
    """Embeddings and transformer blocks of a DiT, without its output layer.

    Returns the output tokens (B, N, D), the time embedding (B, D) and the condition
    c = t_emb + y_emb (B, 1, D); DiT-DH builds its per-token condition from the first two.
    """

    def __init__(self, in_channels: int, grid_size: int, num_classes: int, hidden: int,
                 depth: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 label_dropout: float = 0.1, label_std: float = 0.02):
        super().__init__()
        self.x_embed = xavier_linear(nn.Linear(in_channels, hidden))  # 1x1 patch embedding
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, grid_size), persistent=False)
        self.t_embed = TimestepEmbedder(hidden)
        self.y_embed = LabelEmbedder(num_classes, hidden, label_dropout, label_std)
        self.rope = RoPE2D(hidden // heads, grid_size)
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio, qk_norm) for _ in range(depth))

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.x_embed(tokens) + self.pos_embed  # (B, N, D)
        t_emb = self.t_embed(t)  # (B, D)
        c = (t_emb + self.y_embed(y, force_drop_ids))[:, None]  # (B, 1, D)
        for block in self.blocks:
            x = block(x, c, self.rope)
        return x, t_emb, c


class DiT(nn.Module):
    def __init__(self, in_channels: int, grid_size: int, num_classes: int, hidden: int,
                 depth: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 label_dropout: float = 0.1, label_std: float = 0.02):
        super().__init__()
        self.in_channels, self.grid_size, self.num_classes = in_channels, grid_size, num_classes
        self.body = DiTBody(in_channels, grid_size, num_classes, hidden, depth, heads, mlp_ratio,
                            qk_norm, label_dropout, label_std)
        self.final = FinalLayer(hidden, in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) at time t (B,) with labels y (B,) -> velocity (B, C, H, W)."""
        h, _, c = self.body(to_tokens(x), t, y, force_drop_ids)  # (B, N, D), _, (B, 1, D)
        return to_latent(self.final(h, c), self.grid_size)

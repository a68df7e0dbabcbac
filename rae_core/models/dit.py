"""DiT on RAE latents, LightningDiT-style.

A token is a p x p patch of the latent (p = 1 by default: every latent position, a C-dim encoder
token, is one transformer token), embedded by a Linear p*p*C -> D. Fixed 2D sin-cos position
embedding plus 2D RoPE in every attention, both over the H/p x W/p token grid; RMSNorm, SwiGLU,
adaLN-Zero conditioned on c = t_emb + y_emb (the SiLU sits in front of each adaLN linear, so
every block sees SiLU(t_emb + y_emb)). Predicts the flow-matching velocity.

`double_silu` reproduces the released reference models, whose condition is SiLU(t_emb + y_emb)
before an adaLN that applies SiLU again: the blocks see SiLU(SiLU(t_emb + y_emb)). Off by
default; on only for loading their checkpoints (rae_core.released).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rae_core.models.blocks import (
    Block,
    FinalLayer,
    LabelEmbedder,
    RoPE2D,
    TimestepEmbedder,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
    xavier_linear,
)


class DiTBody(nn.Module):
    """Embeddings and transformer blocks of a DiT, without its output layer.

    Takes patchified tokens (B, N, p*p*C). Returns the output tokens (B, N, D), the time
    embedding (B, D) and the condition c = t_emb + y_emb (B, 1, D), SiLU(t_emb + y_emb) with
    `double_silu`; DiT-DH builds its per-token condition from the first two.
    """

    def __init__(self, in_channels: int, grid_size: int, num_classes: int, hidden: int,
                 depth: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 label_dropout: float = 0.1, label_std: float = 0.02, patch: int = 1,
                 double_silu: bool = False):
        super().__init__()
        self.double_silu = double_silu
        tokens_per_side = grid_size // patch
        self.x_embed = xavier_linear(nn.Linear(patch * patch * in_channels, hidden))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, tokens_per_side),
                             persistent=False)
        self.t_embed = TimestepEmbedder(hidden)
        self.y_embed = LabelEmbedder(num_classes, hidden, label_dropout, label_std)
        self.rope = RoPE2D(hidden // heads, tokens_per_side)
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio, qk_norm) for _ in range(depth))

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.x_embed(tokens) + self.pos_embed  # (B, N, D)
        t_emb = self.t_embed(t)  # (B, D)
        c = (t_emb + self.y_embed(y, force_drop_ids))[:, None]  # (B, 1, D)
        if self.double_silu:  # every adaLN applies SiLU once more
            c = F.silu(c)
        for block in self.blocks:
            x = block(x, c, self.rope)
        return x, t_emb, c


class DiT(nn.Module):
    def __init__(self, in_channels: int, grid_size: int, num_classes: int, hidden: int,
                 depth: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 label_dropout: float = 0.1, label_std: float = 0.02, patch: int = 1,
                 double_silu: bool = False):
        super().__init__()
        self.in_channels, self.grid_size, self.num_classes = in_channels, grid_size, num_classes
        self.patch = patch
        self.body = DiTBody(in_channels, grid_size, num_classes, hidden, depth, heads, mlp_ratio,
                            qk_norm, label_dropout, label_std, patch, double_silu)
        self.final = FinalLayer(hidden, patch * patch * in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) at time t (B,) with labels y (B,) -> velocity (B, C, H, W)."""
        tokens = patchify(x, self.patch)  # (B, N, p*p*C)
        h, _, c = self.body(tokens, t, y, force_drop_ids)  # (B, N, D), _, (B, 1, D)
        return unpatchify(self.final(h, c), self.patch, self.grid_size)

"""DiT-DH: a DiT body followed by a shallow, very wide "DDT head".

The body (DiT without its output layer) turns (x_t, t, y) into tokens s. Each token gives the
head its own condition z = Linear(SiLU(t_emb + s)). The head re-embeds x_t with its own patch
embedding (2D RoPE, no absolute position embedding) and runs a few wide blocks whose adaLN is
driven per token by z, then RMSNorm + per-token shift/scale + Linear to the patch's values.
The head's width, not the body's, is what must reach the values of a token (p*p*C).
`double_silu` is the body's option (see dit.py); the head's condition is the same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rae_core.models.blocks import Block, FinalLayer, RoPE2D, patchify, unpatchify, xavier_linear
from rae_core.models.dit import DiTBody


class DiTDH(nn.Module):
    def __init__(self, in_channels: int, grid_size: int, num_classes: int, hidden: int,
                 depth: int, heads: int, head_hidden: int, head_depth: int, head_heads: int,
                 mlp_ratio: float = 4.0, qk_norm: bool = False, label_dropout: float = 0.1,
                 label_std: float = 0.02, patch: int = 1, double_silu: bool = False):
        super().__init__()
        self.in_channels, self.grid_size, self.num_classes = in_channels, grid_size, num_classes
        self.patch = patch
        self.body = DiTBody(in_channels, grid_size, num_classes, hidden, depth, heads, mlp_ratio,
                            qk_norm, label_dropout, label_std, patch, double_silu)
        # as the reference: no projection when body and head are equally wide
        self.s_proj = xavier_linear(nn.Linear(hidden, head_hidden)) if hidden != head_hidden \
            else nn.Identity()
        self.x_embed = xavier_linear(nn.Linear(patch * patch * in_channels, head_hidden))
        self.rope = RoPE2D(head_hidden // head_heads, grid_size // patch)
        self.blocks = nn.ModuleList(Block(head_hidden, head_heads, mlp_ratio, qk_norm)
                                    for _ in range(head_depth))
        self.final = FinalLayer(head_hidden, patch * patch * in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) at time t (B,) with labels y (B,) -> velocity (B, C, H, W)."""
        tokens = patchify(x, self.patch)  # (B, N, p*p*C)
        s, t_emb, _ = self.body(tokens, t, y, force_drop_ids)  # (B, N, D), (B, D)
        z = self.s_proj(F.silu(s + t_emb[:, None]))  # (B, N, Dh): one condition per token
        h = self.x_embed(tokens)  # (B, N, Dh)
        for block in self.blocks:
            h = block(h, z, self.rope)
        return unpatchify(self.final(h, z), self.patch, self.grid_size)

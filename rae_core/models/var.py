"""VAR: class-conditional next-scale prediction (Tian et al. 2024), the discrete half of HART.

The sequence is the K token maps of a multi-scale quantiser, smallest first, L = sum k^2 tokens.
The first scale's tokens are the class embedding plus a learned start position; each later
scale's tokens are the running f_hat of the scales before it, area-downsampled to its side and
embedded by a Linear C -> D. Every token adds a learned absolute position and the embedding of
its scale (level). A block-causal mask lets a token see all tokens of its own and earlier
scales, so one forward pass predicts every scale from the scales below it. The class embedding
also drives adaLN in every block (LayerNorm without affine, GELU(tanh) MLP) and before the head.
Sampling runs one scale at a time on a cache of the earlier scales' keys and values.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rae_core.models.blocks import AdaLN, modulate
from rae_core.quantize import num_tokens


def block_causal_mask(scales: tuple[int, ...]) -> torch.Tensor:
    """(L, L) bool, True where token i may attend token j: j's scale is i's or an earlier one."""
    level = torch.cat([torch.full((k * k,), si) for si, k in enumerate(scales)])  # (L,)
    return level[:, None] >= level[None, :]


@dataclass
class KVCache:
    """Keys and values (B, heads, l, head_dim) of every block over the first `length` tokens."""

    layers: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    length: int = 0


class Attention(nn.Module):
    """VAR's attention. qkv has no bias but q and v have their own (a key bias would add the
    same score to every key of a query, which softmax ignores); q and k are L2-normalised per
    head and the scores multiplied by a learned per-head temperature (attn_l2_norm: starts at 4,
    at most 100)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, N, D) -> (B, N, D) and the keys and values (B, heads, l + N, head_dim), which
        include the `past` ones of l earlier tokens."""
        B, N, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        q = F.normalize(q, dim=-1) * self.log_scale.clamp_max(math.log(100)).exp()
        k = F.normalize(k, dim=-1)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.proj(x.transpose(1, 2).reshape(B, N, D)), (k, v)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VARBlock(nn.Module):
    """Pre-norm block: LayerNorm (no affine) + adaLN from the class embedding, its own per block
    (VAR's shared_aln=False); attention, then the MLP, each gated."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.mlp = MLP(dim, round(dim * mlp_ratio))
        self.ada = AdaLN(dim, dim, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        # x: (B, N, D); c: (B, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        h, kv = self.attn(modulate(self.norm(x), shift1, scale1), mask, past)
        x = x + gate1 * h
        return x + gate2 * self.mlp(modulate(self.norm(x), shift2, scale2)), kv


class VAR(nn.Module):
    def __init__(self, vocab: int, channels: int, scales: tuple[int, ...], depth: int,
                 width: int | None = None, heads: int | None = None, num_classes: int = 1000,
                 mlp_ratio: float = 4.0, label_dropout: float = 0.1):
        super().__init__()
        width, heads = width or 64 * depth, heads or depth  # VAR: width 64 x depth, heads = depth
        self.vocab, self.channels, self.scales = vocab, channels, tuple(scales)
        self.num_classes, self.label_dropout, self.width = num_classes, label_dropout, width
        sizes = [k * k for k in self.scales]
        self.ends = tuple(itertools.accumulate(sizes))  # the token after each scale
        self.begins = (0, *self.ends[:-1])
        L = num_tokens(self.scales)

        self.word_embed = nn.Linear(channels, width)
        self.class_emb = nn.Embedding(num_classes + 1, width)  # last row: the null class (CFG)
        self.pos_start = nn.Parameter(torch.empty(1, sizes[0], width))
        self.pos_embed = nn.Parameter(torch.empty(1, L, width))
        self.level_embed = nn.Embedding(len(sizes), width)
        levels = torch.cat([torch.full((n,), si) for si, n in enumerate(sizes)])
        self.register_buffer("levels", levels, persistent=False)  # (L,)
        self.register_buffer("mask", block_causal_mask(self.scales), persistent=False)  # (L, L)
        self.blocks = nn.ModuleList(VARBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.head_norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.head_ada = AdaLN(width, width, 2)
        self.head = nn.Linear(width, vocab)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        std = (1 / (3 * self.width)) ** 0.5  # VAR's init_std of every linear and table
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for table in (self.pos_start, self.pos_embed):
            nn.init.trunc_normal_(table, std=std)
        with torch.no_grad():
            self.head.weight.mul_(0.02)  # near-uniform first predictions: loss starts at log V
            self.head_ada.linear.weight.mul_(0.5)
            for block in self.blocks:
                # GPT-2's scaling: the 2 * depth residual branches sum to about unit variance
                block.attn.proj.weight.div_(math.sqrt(2 * depth))
                block.mlp.fc2.weight.div_(math.sqrt(2 * depth))
                # gates 1e-5: every block starts as (almost) the identity; shifts, scales x 0.5
                ada = block.ada.linear.weight.view(6, self.width, self.width)
                ada[[2, 5]] *= 1e-5
                ada[[0, 1, 3, 4]] *= 0.5

    def _level_pos(self, begin: int, end: int) -> torch.Tensor:
        return self.level_embed(self.levels[begin:end]) + self.pos_embed[:, begin:end]  # (1, n, D)

    def _logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.head_ada(cond[:, None])
        return self.head(modulate(self.head_norm(x), shift, scale))  # (B, n, vocab)

    def forward(self, labels: torch.Tensor, inputs: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits of every scale at once.

        labels (B,); inputs (B, n - scales[0]**2, C), the quantiser's `teacher_inputs` or a
        prefix of them ending at a scale boundary. Returns the logits (B, n, vocab) and `hidden`
        (B, n, D): the last block's output, before the head's LayerNorm, adaLN and projection
        (HART conditions its residual head on it: its `last_layer_cond`). In training mode a
        label becomes the null class with probability `label_dropout`.
        """
        n = self.ends[0] + inputs.shape[1]
        if n not in self.ends:
            raise ValueError(f"{inputs.shape[1]} input tokens do not end a scale (scales "
                             f"{self.scales} end at {[e - self.ends[0] for e in self.ends]})")
        if self.training and self.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
            labels = torch.where(drop, self.num_classes, labels)
        cond = self.class_emb(labels)  # (B, D)
        start = cond[:, None] + self.pos_start  # (B, first, D)
        x = torch.cat([start, self.word_embed(inputs)], dim=1) + self._level_pos(0, n)
        for block in self.blocks:
            x, _ = block(x, cond[:, None], self.mask[:n, :n])
        return self._logits(x, cond), x

    def new_cache(self) -> KVCache:
        return KVCache([None] * len(self.blocks))

    def step(self, labels: torch.Tensor, si: int, inputs: torch.Tensor | None,
             cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale si alone, on the cache of scales 0..si-1 (which it then extends).

        inputs: (B, k*k, C) for si > 0, the previous step's `next_input` flattened row-major;
        None at the first scale. No label dropout. Returns logits (B, k*k, vocab) and hidden
        (B, k*k, D) as `forward` does for those tokens.
        """
        begin, end = self.begins[si], self.ends[si]
        if cache.length != begin:
            raise ValueError(f"the cache holds {cache.length} tokens but scale {si} begins at "
                             f"token {begin}: run the scales in order on a fresh cache")
        cond = self.class_emb(labels)  # (B, D)
        x = cond[:, None] + self.pos_start if si == 0 else self.word_embed(inputs)
        x = x + self._level_pos(begin, end)  # (B, k*k, D)
        for i, block in enumerate(self.blocks):
            # no mask: this scale's tokens see each other and every cached earlier token
            x, cache.layers[i] = block(x, cond[:, None], past=cache.layers[i])
        cache.length = end
        return self._logits(x, cond), x

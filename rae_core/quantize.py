"""VAR's multi-scale residual vector quantiser: the tokenizer of next-scale prediction.

A latent f (B, C, H, W) becomes K token maps of sides scales[0] < ... < scales[-1] = H = W.
Per scale k the residual (what the earlier scales have not yet explained) is area-downsampled to
k x k, every position takes its nearest code (L2), the code map is upsampled bicubic back to
H x W (not at the last scale), refined by a shared convolution phi, added to the running sum
f_hat and subtracted from the residual. HART keeps what all K scales miss, f - f_hat, as one
continuous token map for its residual diffusion head (`residual`). (HART's own quantiser skips
phi at the last scale; this one refines every scale, as VAR does.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantOutput:
    f_hat: torch.Tensor  # (B, C, H, W): the discrete latent, straight-through to f
    loss: torch.Tensor  # codebook + commitment loss, a scalar
    indices: list[torch.Tensor]  # one (B, k*k) LongTensor per scale, row-major
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram
    dead_codes: int  # codes this batch never used


def codebook_usage(indices: list[torch.Tensor], vocab: int) -> tuple[torch.Tensor, int]:
    """(perplexity, dead codes) of the codes used over all scales: vocab when every code is used
    equally often, 1 when one code is used everywhere."""
    counts = torch.cat([i.flatten() for i in indices]).bincount(minlength=vocab).float()
    p = counts / counts.sum()
    entropy = -(p * p.clamp_min(1e-12).log()).sum()  # 0 log 0 = 0
    return entropy.exp(), int((counts == 0).sum())


def phi_index(scale_index: int, num_scales: int, num_phi: int) -> int:
    """Which of the shared phi convolutions refines scale `scale_index`.

    VAR (models/quant.py, PhiPartiallyShared): the scale sits at si / (K - 1) in [0, 1] and takes
    the nearest of n ticks linspace(1/(3n), 1 - 1/(3n), n) when n == 4, else linspace(1/(2n),
    1 - 1/(2n), n); a tie goes to the lower tick (np.argmin). With VAR's 10 scales and 4 convs,
    scale 2 sits exactly between two ticks, so the ticks are computed with numpy's arithmetic
    (start + i * step, the last one = stop) to break that tie as VAR does."""
    start = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    stop = 1 - start
    step = (stop - start) / (num_phi - 1) if num_phi > 1 else 0.0
    ticks = [i * step + start for i in range(num_phi - 1)] + [stop]
    at = scale_index / (num_scales - 1) if num_scales > 1 else 1.0  # one scale: the last
    return min(range(num_phi), key=lambda i: abs(ticks[i] - at))


class Phi(nn.Module):
    """phi(h) = (1 - r) h + r conv3x3(h): VAR's refinement of an upsampled code map (r = 0.5)."""

    def __init__(self, channels: int, ratio: float = 0.5):
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (1 - self.ratio) * h + self.ratio * self.conv(h)


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab: int, channels: int, scales: tuple[int, ...], beta: float = 0.25,
                 num_phi: int = 4, phi_ratio: float = 0.5):
        super().__init__()
        if list(scales) != sorted(set(scales)) or scales[0] < 1:
            raise ValueError(f"scales must be positive and strictly increasing, got {scales}")
        self.vocab, self.channels, self.scales, self.beta = vocab, channels, tuple(scales), beta
        self.embedding = nn.Embedding(vocab, channels)
        # codes start near the encoder's small outputs: at N(0, 1) a small tokenizer's latents
        # all fall to the same few codes (2-4 of 64 in use) and the rest never train
        nn.init.uniform_(self.embedding.weight, -1.0 / vocab, 1.0 / vocab)
        self.phis = nn.ModuleList(Phi(channels, phi_ratio) for _ in range(num_phi))
        self.phi_of_scale = tuple(phi_index(si, len(scales), num_phi) for si in range(len(scales)))

    @property
    def side(self) -> int:
        return self.scales[-1]

    def _nearest(self, rest: torch.Tensor, k: int) -> torch.Tensor:
        """Index (B, k*k) of the code nearest (L2) to each position of the residual at k x k."""
        B, C = rest.shape[:2]
        z = rest if k == self.side else F.interpolate(rest, size=(k, k), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B*k*k, C), row-major positions
        codes = self.embedding.weight.detach()  # (V, C)
        dist = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z @ codes.T  # (N, V)
        return dist.argmin(1).view(B, k * k)

    def _codes(self, idx: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k*k) indices -> (B, C, k, k) code map."""
        return self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.channels, k, k)

    def _lift(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """Scale si's code map (B, C, k, k) -> its refined contribution (B, C, H, W) to f_hat."""
        if h.shape[-1] != self.side:
            h = F.interpolate(h, size=(self.side, self.side), mode="bicubic")
        return self.phis[self.phi_of_scale[si]](h)

    def forward(self, f: torch.Tensor) -> QuantOutput:
        """f (B, C, H, W) -> the discrete latent (straight-through), the loss, the codes."""
        if f.shape[-2:] != (self.side, self.side):
            raise ValueError(f"latent of side {tuple(f.shape[-2:])} does not match the last "
                             f"scale {self.side}")
        f_ng = f.detach()
        rest, f_hat = f_ng.clone(), torch.zeros_like(f_ng)
        loss, indices = f.new_zeros(()), []
        for si, k in enumerate(self.scales):
            idx = self._nearest(rest, k)
            h = self._lift(si, self._codes(idx, k))  # (B, C, H, W), carries the codebook's grad
            f_hat = f_hat + h
            rest = rest - h.detach()
            indices.append(idx)
            # as VAR: the running sum f_hat_k = sum_{j<=k} h_j (not h_k alone) against the whole
            # f; beta * ||sg(f_hat_k) - f||^2 moves the encoder, ||f_hat_k - sg(f)||^2 the codes
            # and the phi convolutions
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_ng)
        perplexity, dead = codebook_usage(indices, self.vocab)
        return QuantOutput(f + (f_hat - f).detach(), loss / len(self.scales), indices,
                           perplexity, dead)

    @torch.no_grad()
    def f_to_indices(self, f: torch.Tensor) -> list[torch.Tensor]:
        """f (B, C, H, W) -> one (B, k*k) index map per scale (VAR's f_to_idxBl_or_fhat)."""
        rest, indices = f.detach().clone(), []
        for si, k in enumerate(self.scales):
            idx = self._nearest(rest, k)
            rest = rest - self._lift(si, self._codes(idx, k))
            indices.append(idx)
        return indices

    def indices_to_f_hat(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The discrete latent (B, C, H, W): the sum of every scale's refined code map."""
        return sum(self._lift(si, self._codes(idx, k))
                   for si, (idx, k) in enumerate(zip(indices, self.scales, strict=True)))

    @torch.no_grad()
    def residual(self, f: torch.Tensor) -> torch.Tensor:
        """HART's continuous residual token map f - (sum of all discrete scales), (B, C, H, W)."""
        return f - self.indices_to_f_hat(self.f_to_indices(f))

    @torch.no_grad()
    def teacher_inputs(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The transformer's inputs for scales 2..K (B, L - scales[0]**2, C): after scale k the
        running f_hat, area-downsampled to scale k+1, flattened row-major (VAR's
        idxBl_to_var_input). Without gradient: the tokenizer is frozen while the transformer
        trains."""
        B, weight = indices[0].shape[0], self.embedding.weight
        f_hat = weight.new_zeros(B, self.channels, self.side, self.side)
        inputs = [weight.new_zeros(B, 0, self.channels)]  # a single scale has no inputs
        for si in range(len(self.scales) - 1):
            f_hat, nxt = self.next_input(si, f_hat, self._codes(indices[si], self.scales[si]))
            inputs.append(nxt.flatten(2).transpose(1, 2))  # (B, k'*k', C)
        return torch.cat(inputs, dim=1)

    def next_input(self, si: int, f_hat: torch.Tensor, h: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sampling step (VAR's get_next_autoregressive_input): add scale si's code map h
        (B, C, k, k) to f_hat (B, C, H, W); return the new f_hat and the next scale's input
        (B, C, k', k'), None after the last scale."""
        f_hat = f_hat + self._lift(si, h)
        if si == len(self.scales) - 1:
            return f_hat, None
        k = self.scales[si + 1]
        return f_hat, F.interpolate(f_hat, size=(k, k), mode="area")


def num_tokens(scales: tuple[int, ...]) -> int:
    """L: the tokens of all scales together (680 for VAR's 256 px scales)."""
    return sum(k * k for k in scales)


"""HART's discrete half: sampling VAR's tokens scale by scale, with classifier-free guidance.

HART (Tang, Wu et al. 2025) = VAR for the discrete tokens + a small diffusion head for the
continuous residual the discrete scales miss. This module samples the discrete tokens and hands
the residual head what it is conditioned on: the last scale's hidden states. CFG follows VAR and
HART: the conditional and unconditional halves run as one batch of 2B, their logits are combined
as (1 + w) c - w u, and w ramps linearly from 0 at the first scale to the full scale at the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rae_core.diffusion import GaussianDiffusion
from rae_core.models.residual_head import residual_diffusion, residual_loss, sample_residual
from rae_core.models.var import VAR
from rae_core.quantize import MultiScaleQuantizer


class HART(nn.Module):
    """A VAR and the residual head (rae_core.models.residual_head) that HART adds to it: the
    cross-entropy trains `var`, the diffusion loss on the quantiser's residual `residual_head`
    (and, through the head's condition, the transformer too)."""

    def __init__(self, var: VAR, residual_head: nn.Module):
        super().__init__()
        self.var = var
        self.residual_head = residual_head

    def head_condition(self, quantizer: MultiScaleQuantizer, hidden: torch.Tensor,
                       last_indices: torch.Tensor) -> torch.Tensor:
        """z (B, n, D) for the head at the n last-scale tokens: the transformer's hidden state
        there plus the embedding of the token at that position (sampled, or the true one in
        training), normalised (HART)."""
        z = hidden + self.var.word_embed(quantizer.embedding(last_indices))  # (B, n, D)
        return F.layer_norm(z, z.shape[-1:])


@dataclass
class HARTLoss:
    total: torch.Tensor  # tokens + residual_weight * residual
    tokens: torch.Tensor  # cross-entropy over every scale's tokens
    residual: torch.Tensor  # the head's diffusion loss on the masked last-scale residuals
    accuracy: torch.Tensor  # next-token accuracy, for the curves


def token_loss(var: VAR, quantizer: MultiScaleQuantizer, f: torch.Tensor, labels: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """VAR's objective on latents f (B, C, H, W) of a frozen tokenizer: the transformer
    teacher-forced on the true tokens of every scale. Returns the cross-entropy, the next-token
    accuracy, the hidden states (B, L, D) and the true tokens of each scale."""
    with torch.no_grad(), torch.autocast(f.device.type, enabled=False):  # exact codes in fp32
        indices = quantizer.f_to_indices(f.float())
        inputs = quantizer.teacher_inputs(indices)
    logits, hidden = var(labels, inputs)  # (B, L, V), (B, L, D)
    target = torch.cat(indices, dim=1)  # (B, L)
    tokens = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
    accuracy = (logits.argmax(-1) == target).float().mean()
    return tokens, accuracy, hidden, indices


def hart_loss(model: HART, quantizer: MultiScaleQuantizer, f: torch.Tensor,
              labels: torch.Tensor, diffusion: GaussianDiffusion, residual_weight: float = 1.0,
              residual_scale: float = 1.0, mask_ratio: tuple[float, float] = (0.5, 1.0),
              generator: torch.Generator | None = None) -> HARTLoss:
    """HART's training objective on latents f (B, C, H, W) of a frozen tokenizer.

    The transformer learns the tokens of every scale (`token_loss`). The head learns the
    continuous residual f - (sum of the scales) at the last scale, divided by `residual_scale`
    so that it lies in the [-1, 1] its clipped sampler assumes (HART: 0.6), on a random 50-100 %
    of the positions per image (MAR's masking; here it thins the head's targets, the transformer
    still sees every token). HART's code does not say how the two losses are added:
    `residual_weight` (default 1) adds them as two per-token means, so neither dominates by its
    token count; the head's gradient also reaches the transformer through its condition, as
    MAR's does."""
    tokens, accuracy, hidden, indices = token_loss(model.var, quantizer, f, labels)
    with torch.no_grad(), torch.autocast(f.device.type, enabled=False):
        residual = quantizer.residual(f.float()).flatten(2).transpose(1, 2) / residual_scale
    B, n, C = residual.shape  # (B, n, C): the last scale's n positions
    z = model.head_condition(quantizer, hidden[:, -n:], indices[-1])  # (B, n, D)
    lo, hi = mask_ratio
    draw_on = generator.device if generator is not None else f.device
    ratio = lo + (hi - lo) * torch.rand(B, generator=generator, device=draw_on)
    masked = torch.ceil(ratio * n).long().clamp(1, n).to(f.device)  # (B,): at least one each
    order = torch.rand(B, n, generator=generator, device=draw_on).argsort(dim=1).to(f.device)
    mask = order < masked[:, None]  # (B, n): `masked` random positions of each image
    res = residual_loss(model.residual_head, diffusion, residual.reshape(B * n, C),
                        z.reshape(B * n, -1), mask.reshape(-1), generator=generator)
    return HARTLoss(tokens + residual_weight * res, tokens, res, accuracy)


@dataclass
class TokenSample:
    indices: list[torch.Tensor]  # one (B, k*k) LongTensor per scale
    f_hat: torch.Tensor  # (B, C, H, W): the discrete latent
    hidden: torch.Tensor  # (B, K_last^2, D): the last scale's hidden states, conditional half
    hidden_uncond: torch.Tensor  # (B, K_last^2, D): the same for the null class (head's CFG)


def cfg_ramp(scale_index: int, num_scales: int, scale: float) -> float:
    """The guidance weight w at a scale: 0 at the first, `scale` at the last, linear between."""
    return scale * scale_index / (num_scales - 1) if num_scales > 1 else scale


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (..., V) with -inf outside the top k and outside the smallest set of most likely
    tokens whose probability reaches top_p (after top-k). top_k=0 / top_p=1.0: off."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties at the k-th stay, as VAR
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop = mass_before >= top_p  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample_tokens(var: VAR, quantizer: MultiScaleQuantizer, labels: torch.Tensor,
                  cfg_scale: float, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, temperature: float = 1.0,
                  use_cache: bool = True) -> TokenSample:
    """Sample every scale's tokens for `labels` (B,). All random draws come from `generator`.

    With `use_cache=False` each scale reruns the full masked forward over all tokens so far (the
    reference the KV cache must reproduce; quadratic in the scales, for tests). The model runs in
    eval mode and is put back in the mode it was in.
    """
    if var.scales != quantizer.scales:
        raise ValueError(f"the model predicts scales {var.scales} but the quantiser has "
                         f"{quantizer.scales}")
    B, K = labels.shape[0], len(var.scales)
    both = torch.cat([labels, torch.full_like(labels, var.num_classes)])  # (2B,): c, then u
    f_hat = quantizer.embedding.weight.new_zeros(B, quantizer.channels, quantizer.side,
                                                 quantizer.side)
    cache, inputs = var.new_cache(), None
    seen = [f_hat.new_zeros(2 * B, 0, var.channels)]  # every input so far, for use_cache=False
    indices = []
    was_training = var.training
    var.eval()
    try:
        for si, k in enumerate(var.scales):
            if use_cache:
                logits, hidden = var.step(both, si, inputs, cache)  # (2B, k*k, V), (2B, k*k, D)
            else:
                logits, hidden = var(both, torch.cat(seen, dim=1))
                logits, hidden = logits[:, -k * k:], hidden[:, -k * k:]
            w = cfg_ramp(si, K, cfg_scale)
            guided = ((1 + w) * logits[:B] - w * logits[B:]) / temperature  # (B, k*k, V)
            probs = filter_logits(guided, top_k, top_p).softmax(-1).view(B * k * k, -1)
            idx = torch.multinomial(probs, 1, generator=generator).view(B, k * k)
            indices.append(idx)
            codes = quantizer.embedding(idx).transpose(1, 2).reshape(B, -1, k, k)  # (B, C, k, k)
            f_hat, nxt = quantizer.next_input(si, f_hat, codes)
            if nxt is not None:
                inputs = nxt.flatten(2).transpose(1, 2).repeat(2, 1, 1)  # (2B, k'*k', C)
                seen.append(inputs)
    finally:
        var.train(was_training)
    return TokenSample(indices, f_hat, hidden[:B], hidden[B:])


@torch.no_grad()
def generate(model: HART | VAR, quantizer: MultiScaleQuantizer, labels: torch.Tensor,
             cfg_scale: float, top_k: int = 0, top_p: float = 1.0, residual: bool = True,
             residual_steps: int = 8, residual_scale: float = 1.0, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents (B, C, H, W) for `labels`: the tokens scale by scale, then (HART, `residual`
    on) the residual head in `residual_steps` steps at the last scale, added to the discrete
    latent. `residual=False`, or a plain VAR, gives the discrete-only latent (the ablation).
    The head runs on the conditional half only; guiding it too (HART: (1 + w) eps_c - w eps_u)
    is not done here."""
    var = model.var if isinstance(model, HART) else model
    tokens = sample_tokens(var, quantizer, labels, cfg_scale, top_k, top_p, generator,
                           temperature)
    if not residual or not isinstance(model, HART):
        return tokens.f_hat
    B, C, k = labels.shape[0], quantizer.channels, quantizer.side
    z = model.head_condition(quantizer, tokens.hidden, tokens.indices[-1])  # (B, k*k, D)
    r = sample_residual(model.residual_head, z.flatten(0, 1), residual_steps,
                        generator=generator)  # (B*k*k, C)
    return tokens.f_hat + residual_scale * r.view(B, k * k, C).transpose(1, 2).reshape(B, C, k, k)


class ScalewiseGenerator(nn.Module):
    """What train-generator trains and `sample` loads for generator.kind = hart: a VAR or a
    HART over the tokens of a frozen multi-scale quantiser. It keeps the quantiser (codebook and
    phi convolutions) and the residual scale, so a checkpoint samples on its own; forward is the
    training loss, a dict of tensors (DDP-friendly)."""

    def __init__(self, model: HART | VAR, quantizer: MultiScaleQuantizer,
                 residual_scale: float = 1.0):
        super().__init__()
        self.model = model
        self.quantizer = quantizer.requires_grad_(False)
        self.register_buffer("residual_scale", torch.tensor(float(residual_scale)))
        self.diffusion = residual_diffusion()

    @property
    def has_head(self) -> bool:
        return isinstance(self.model, HART)

    def forward(self, f: torch.Tensor, labels: torch.Tensor, residual_weight: float = 1.0,
                mask_ratio: tuple[float, float] = (0.5, 1.0)) -> dict[str, torch.Tensor]:
        if not self.has_head:
            tokens, accuracy, _, _ = token_loss(self.model, self.quantizer, f, labels)
            return {"total": tokens, "tokens": tokens, "accuracy": accuracy}
        out = hart_loss(self.model, self.quantizer, f, labels, self.diffusion, residual_weight,
                        float(self.residual_scale), tuple(mask_ratio))
        return {"total": out.total, "tokens": out.tokens, "residual": out.residual,
                "accuracy": out.accuracy}

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, cfg_scale: float, top_k: int = 0,
                 top_p: float = 1.0, residual: bool = True, residual_steps: int = 8,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents (B, C, H, W) for `labels`, as rae_core.hart.generate samples them."""
        return generate(self.model, self.quantizer, labels, cfg_scale, top_k, top_p, residual,
                        residual_steps, float(self.residual_scale), generator=generator)

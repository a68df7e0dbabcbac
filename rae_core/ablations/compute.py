"""Training compute: what a generator costs, how arms are matched to one budget, and the compute
a FID curve needs to reach a given FID.

Training compute of a generator = 3 x forward FLOPs per image x batch x steps.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

from rae_core.config import Config

if TYPE_CHECKING:
    from rae_core.hybrid_vq import TokenizerConfig


def train_flops(flops_per_image: float, batch: int, steps: int) -> float:
    """Training FLOPs: forward + backward ~ 3 x forward, per image, per step."""
    return 3.0 * flops_per_image * batch * steps


def matched_steps(target_flops: float, flops_per_image: float, batch: int) -> int:
    """Steps at which a model of `flops_per_image` spends `target_flops` of training compute."""
    return max(1, round(target_flops / train_flops(flops_per_image, batch, 1)))


def matched_depth(model: str, channels: int, grid: int, target_per_image: float,
                  max_depth: int = 32, **overrides: Any) -> int:
    """The depth whose forward FLOPs per image are closest (in ratio) to `target_per_image`, so
    that equal compute also means about equal steps (and the same learning-rate schedule)."""
    from rae_core.models import model_flops_per_image

    def distance(depth: int) -> float:
        f = model_flops_per_image(model, channels, grid, **{**overrides, "depth": depth})
        return abs(math.log(f / target_per_image))

    return min(range(1, max_depth + 1), key=distance)


def scalewise_flops_per_image(cfg: Config) -> float:
    """Forward FLOPs per image of one training step of a VAR or HART (generator.kind = hart):
    the loss of rae_core.hart.ScalewiseGenerator, i.e. the frozen quantiser's tokenisation, the
    transformer over every scale and the residual head on its mean share of the last scale's
    tokens (generator.mask_ratio), counted by torch's FlopCounterMode."""
    from rae_core.autoencoder import tokenizer_config

    lo, hi = cfg.generator.mask_ratio
    return _scalewise_flops(cfg.generator.model, tokenizer_config(cfg), cfg.data.num_classes,
                            (lo + hi) / 2)


@functools.lru_cache
def _scalewise_flops(model: str, t: TokenizerConfig, num_classes: int, mask_ratio: float
                     ) -> float:
    """On the CPU, not the meta device: the head drops its unmasked rows, a data-dependent
    shape. Attention runs on the math backend, whose matmuls the counter sees (it counts no
    fused CPU kernel). The random draws leave the global generator as they found it."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from rae_core.hart import ScalewiseGenerator
    from rae_core.models.registry import build_ar_model
    from rae_core.quantize import MultiScaleQuantizer

    quantizer = MultiScaleQuantizer(t.vocab, t.z_channels, t.scales, t.beta)
    net = ScalewiseGenerator(build_ar_model(model, t.vocab, t.z_channels, t.scales,
                                            num_classes), quantizer)
    side = t.resolution // t.downsampling
    with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH), \
            FlopCounterMode(display=False) as counter:
        torch.manual_seed(0)
        net(torch.randn(1, t.z_channels, side, side), torch.zeros(1, dtype=torch.long),
            mask_ratio=(mask_ratio, mask_ratio))
    return float(counter.get_total_flops())


def schedule(cfg: Config, steps: int, checkpoints: int = 1) -> dict[str, Any]:
    """The generator's step counts with warmup and decay at the preset's fractions of training,
    `checkpoints` EMA checkpoints spread evenly (the last at the end) and one preview grid."""
    d = cfg.generator
    return {"generator.steps": steps,
            "generator.warmup_steps": round(d.warmup_steps * steps / d.steps),
            "generator.decay_start_step": round(d.decay_start_step * steps / d.steps),
            "generator.ckpt_every": math.ceil(steps / checkpoints),
            "generator.sample_every": steps}


def ema_for(cfg: Config, steps: int) -> dict[str, Any]:
    """The EMA decay that leaves the random initialisation the same share of the final EMA
    weights in `steps` as the preset's decay does in its steps: far below the preset's steps,
    its decay would keep much of it (0.995 over 200 steps: 37%, over 800: 2%)."""
    d = cfg.generator
    return {"generator.ema": d.ema ** (d.steps / steps)}


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The training FLOPs at which a FID curve [(flops, fid), ...] first reaches `target`,
    interpolated linearly between the two checkpoints around the crossing; the first
    checkpoint's FLOPs when it is already there (an upper bound); None when it never is."""
    prev = None
    for flops, fid in sorted(curve):
        if fid <= target:
            if prev is None:
                return flops
            f0, fid0 = prev
            return f0 + (fid0 - target) / (fid0 - fid) * (flops - f0)
        prev = (flops, fid)
    return None

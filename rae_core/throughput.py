"""How fast a stage went: images per second and, on a GPU whose peak is known, the model FLOP
utilisation (MFU): the model's FLOPs per second over the devices' dense bf16 peak.

A training image costs ~3x its forward FLOPs (forward + backward); a frozen encoder in the step
costs its forward only. The CPU has no peak here, so it gets no MFU.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# dense bf16 FLOP/s of one GPU (SXM parts; matched as a substring of the device's name)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device: torch.device | str) -> float | None:
    """The dense bf16 peak of `device`, or None (the CPU, or a GPU not in PEAK_BF16)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def figures(images: int, seconds: float, flops_per_image: float | None = None,
            device: torch.device | str = "cpu", world: int = 1) -> dict[str, float]:
    """{images_per_s} over all `world` workers, and {mfu} where the peak is known."""
    if images <= 0 or seconds <= 0:
        return {}
    out = {"images_per_s": images / seconds}
    peak = peak_flops(device)
    if peak and flops_per_image:
        out["mfu"] = images * flops_per_image / seconds / (peak * world)
    return out


def report(stage: str, out: dict) -> None:
    """The stage's throughput as one log line (its outputs go to MLflow as stage metrics)."""
    if "images_per_s" in out:
        mfu = f", MFU {out['mfu']:.1%}" if "mfu" in out else ""
        log.info("%s: %.1f images/s%s", stage, out["images_per_s"], mfu)

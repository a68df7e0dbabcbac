"""Where a stage computes: the one place that turns the run's settings into a torch device.

A Ray task or Train worker that reserved a GPU (ray.use_gpu) sees it as cuda:0 (Ray sets
CUDA_VISIBLE_DEVICES); without one everything stays on the CPU, as before. Asking for a GPU on
a process that has none is an error, not a silent fall-back to hours on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from rae_core.errors import ConfigError


def resolve(use_gpu: bool) -> torch.device:
    """The device of this process: its GPU when the run reserved one, else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("ray.use_gpu: true, but this process sees no CUDA device "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                          "set ray.use_gpu=false to compute on the CPU")
    index = torch.cuda.current_device()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def of(cfg) -> torch.device:
    """The device a stage of `cfg` computes on in this process."""
    return resolve(cfg.ray.use_gpu)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch on `n` intra-op threads inside the block; the caller's count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def autocast(device: torch.device, bf16: bool) -> Iterator[None]:
    """bf16 autocast on a GPU when asked; on the CPU nothing changes (fp32, as before)."""
    on = device.type if device.type == "cuda" else "cpu"  # meta (device tests) has no autocast
    with torch.autocast(on, dtype=torch.bfloat16, enabled=bf16 and on == "cuda"):
        yield

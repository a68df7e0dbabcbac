"""Image grids and uint8 conversion without torchvision."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3), clamped and rounded."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: torch.Tensor | np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """Tile N images row-major into one uint8 (H', W', 3) array."""
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else images
    n, h, w, _ = arr.shape
    rows = (n + nrow - 1) // nrow
    out = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y: y + h, x: x + w] = arr[i]
    return out


def save_png(array: np.ndarray, path: str | Path, upscale: int = 1) -> Path:
    """Write a uint8 image atomically; small images can be enlarged for viewing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    im.save(tmp)
    os.replace(tmp, path)
    return path

"""The embedded default dataset: scikit-learn's 1,797 handwritten digits as an image folder.

Each 8x8 digit (17 grey levels, ink bright on black) is upsampled bicubically to 32x32 and stored
as an RGB PNG under train/<class>/ or val/<class>/, with a deterministic stratified split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from rae_core.data.folder import PREPARED, staging, swap_in

DIGITS_SIZE = 32


def digit_images(size: int = DIGITS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 (N, size, size, 3) and their labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # (N, 8, 8)
    up = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC))
                   for g in grey])
    return np.repeat(up[..., None], 3, axis=-1), digits.target.astype(np.int64)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation items: the same fraction of every class, fixed by seed."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        is_val[idx[: round(len(idx) * val_fraction)]] = True
    return is_val


def materialise_digits(root: str | os.PathLike, val_fraction: float, seed: int) -> dict:
    """Write the digits image folder beside `root`, then swap it in whole (replacing a link or
    digits written before; a folder prepare did not make is refused), and return its summary."""
    root = Path(root)
    tmp = staging(root, "the digits")
    images, labels = digit_images()
    is_val = stratified_split(labels, val_fraction, seed)
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for i, (img, label, val) in enumerate(zip(images, labels, is_val, strict=True)):
        split = "val" if val else "train"
        folder = tmp / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png", optimize=False)
        counts[split][str(label)] = counts[split].get(str(label), 0) + 1
    summary = {"dataset": "digits", "size": DIGITS_SIZE, "seed": seed,
               "val_fraction": val_fraction, "counts": counts}
    (tmp / PREPARED).write_text(json.dumps(summary, indent=1, sort_keys=True))
    swap_in(tmp, root)
    return summary

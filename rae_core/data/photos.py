"""A second embedded dataset: crops of the ten colour photographs shipped inside scikit-image and
scikit-learn, one class per photograph.

Each photo is cut across its long side into a training region and a validation region (the last
val_fraction of it), so no validation crop shares a pixel with a training crop. Square crops of
48-128 px (smaller where a region is narrower) are taken at seeded random places in each region,
resized to 32x32 with an antialiasing filter and stored as RGB PNGs under train/<class>/ or
val/<class>/. At a larger size (the rehearsal's 256 px) the same crops are upscaled: the
photos hold no more detail than 48-128 px per crop, enough to run every stage at that size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from rae_core.data.folder import PREPARED, staging, swap_in

PHOTOS_SIZE = 32
PER_CLASS = 225  # crops per photo, split by val_fraction (0.2: 180 train, 45 val)
CROP_SIDES = (48, 128)


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image  # stereo pair: the left view
    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)
    return load


# class name -> loader; every file is inside the installed wheels (none is fetched by pooch)
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    **{name: _skimage(name) for name in (
        "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
        "immunohistochemistry", "retina", "stereo_motorcycle")},
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
}


def regions(shape: tuple[int, ...], val_fraction: float) -> dict[str, tuple[int, int, int, int]]:
    """The disjoint (top, left, height, width) boxes of a photo's train and val crops."""
    h, w = shape[:2]
    if w >= h:
        cut = round(w * (1 - val_fraction))
        return {"train": (0, 0, h, cut), "val": (0, cut, h, w - cut)}
    cut = round(h * (1 - val_fraction))
    return {"train": (0, 0, cut, w), "val": (cut, 0, h - cut, w)}


def crop_boxes(region: tuple[int, int, int, int], n: int,
               rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """n random square crops (top, left, side) inside `region`."""
    top, left, h, w = region
    hi = min(CROP_SIDES[1], h, w)
    lo = min(CROP_SIDES[0], hi)
    boxes = []
    for side in rng.integers(lo, hi + 1, size=n):
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        boxes.append((top + y, left + x, int(side)))
    return boxes


def photo_crops(val_fraction: float, seed: int, size: int = PHOTOS_SIZE,
                per_class: int = PER_CLASS) -> dict:
    """{split: (uint8 images (N, size, size, 3), labels (N,), boxes [(top, left, side)])}, in
    class order; the same under the same seed."""
    rng = np.random.default_rng(seed)
    n_val = round(per_class * val_fraction)
    counts = {"train": per_class - n_val, "val": n_val}
    out: dict = {split: ([], [], []) for split in counts}
    for label, load in enumerate(PHOTOS.values()):
        photo = load()
        for split, box in regions(photo.shape, val_fraction).items():
            images, labels, boxes = out[split]
            for top, left, side in crop_boxes(box, counts[split], rng):
                crop = Image.fromarray(photo[top: top + side, left: left + side])
                images.append(np.asarray(crop.resize((size, size), Image.LANCZOS)))
                labels.append(label)
                boxes.append((top, left, side))
    return {split: (np.stack(im), np.array(lab, dtype=np.int64), boxes)
            for split, (im, lab, boxes) in out.items()}


def materialise_photos(root: str | os.PathLike, val_fraction: float, seed: int,
                       size: int = PHOTOS_SIZE, per_class: int = PER_CLASS) -> dict:
    """Write the photo-crop image folder beside `root`, then swap it in whole (as
    materialise_digits does), and return its summary. `size`: the side of the stored crops
    (upscaled above 128 px); `per_class`: crops per photo, train and val together."""
    root = Path(root)
    tmp = staging(root, "the photos")
    names = list(PHOTOS)
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for split, (images, labels, _) in photo_crops(val_fraction, seed, size, per_class).items():
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            folder = tmp / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.png", optimize=False)
            counts[split][names[label]] = counts[split].get(names[label], 0) + 1
    summary = {"dataset": "photos", "size": size, "per_class": per_class, "seed": seed,
               "val_fraction": val_fraction, "counts": counts}
    (tmp / PREPARED).write_text(json.dumps(summary, indent=1, sort_keys=True))
    swap_in(tmp, root)
    return summary

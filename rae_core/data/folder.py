"""Image folders in the ImageNet layout: <root>/<split>/<class>/<image>.

The same reader serves the shipped digits and ILSVRC train/val folders. Images are converted to
RGB (greyscale, palette and RGBA are accepted) and ADM-centre-cropped to the configured
resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rae_core.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


def center_crop_adm(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: box-halve while the short side is >= 2x size, bicubic to size, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def load_image(path: Path, size: int) -> np.ndarray:
    """uint8 (size, size, 3) RGB; a file PIL cannot decode raises DataError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                # RGBA/LA are composited on black so transparent pixels do not turn random.
                if "A" in im.getbands():
                    bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                    im = Image.alpha_composite(bg, im.convert("RGBA"))
                im = im.convert("RGB")
            return center_crop_adm(im, size)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e}); "
                        "remove or replace the file") from None


@dataclass(frozen=True)
class FolderIndex:
    """The files and labels of one split; classes are the sorted sub-folder names."""

    root: Path
    split: str
    classes: tuple[str, ...]
    files: tuple[Path, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)


def scan_split(root: str | Path, split: str, classes: list[str] | None = None) -> FolderIndex:
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: dataset folder not found; expected <root>/{split}/<class>/"
                        "<image> (run `rae stage prepare` or set data.source)")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    if not classes:
        raise DataError(f"{split_dir}: no class sub-folders; expected {split}/<class>/<image>")
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataError(f"{split_dir}: classes {extra[:5]} are not in the training split")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = split_dir / name
        items = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if folder.is_dir() else []
        if not items:
            raise DataError(f"{folder}: empty class (no image files with suffix "
                            f"{'/'.join(sorted(IMAGE_SUFFIXES))}); add images or remove it")
        files += items
        labels += [label] * len(items)
    return FolderIndex(Path(root), split, tuple(classes), tuple(files), tuple(labels))


def validate_folder(root: str | Path, num_classes: int | None = None,
                    check_files: bool = True, resolution: int = 0) -> dict:
    """Scan train/ and val/, open every image, and report all bad files in one line; images
    smaller than `resolution` are counted and named in a warning."""
    train = scan_split(root, "train")
    val = scan_split(root, "val", list(train.classes))
    if num_classes is not None and len(train.classes) != num_classes:
        raise DataError(f"{Path(root) / 'train'}: {len(train.classes)} classes found but "
                        f"data.num_classes is {num_classes}; set data.num_classes="
                        f"{len(train.classes)}")
    summary = {"classes": list(train.classes), "train": len(train), "val": len(val)}
    if check_files:
        bad, small = [], []
        for f in train.files + val.files:
            try:
                with Image.open(f) as im:
                    size = im.size
                    im.verify()
            except Exception as e:  # noqa: BLE001 - any decoder failure marks the file bad
                bad.append(f"{f} ({type(e).__name__})")
                continue
            if min(size) < resolution:
                small.append(f"{f} ({size[0]}x{size[1]})")
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise DataError(f"unreadable or corrupt images: {'; '.join(bad[:3])}{more}; "
                            "remove or replace them")
        if small:
            # ADM's crop upsamples them (bicubic), as the reference pipeline does: kept, but said
            log.warning("%d images are smaller than the %d px crop and will be upsampled, e.g. %s",
                        len(small), resolution, "; ".join(small[:3]))
        summary["upsampled"] = len(small)
    return summary


class ImageFolderDataset(torch.utils.data.Dataset):
    """(image float (3, R, R) in [0, 1], label) pairs of one split."""

    def __init__(self, root: str | Path, split: str, resolution: int,
                 classes: list[str] | None = None):
        if classes is None and split != "train":
            classes = list(scan_split(root, "train").classes)
        self.index = scan_split(root, split, classes)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = load_image(self.index.files[i], self.resolution)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255), \
            self.index.labels[i]

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in file order, `size` images at a time: images (n, 3, R, R) in [0, 1] and
        labels (n,). Memory is bounded by `size`, not by the split (ImageNet's train split is
        ~1 TB as float32 at 256 px)."""
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            yield (torch.stack([self[i][0] for i in range(start, stop)]),
                   torch.tensor(self.index.labels[start:stop], dtype=torch.long))


def load_split(root: str | Path, split: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (small) split in memory: images (N, 3, R, R) in [0, 1] and labels (N,)."""
    ds = ImageFolderDataset(root, split, resolution)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return images, torch.tensor(ds.index.labels, dtype=torch.long)


def iter_split(root: str | Path, split: str, resolution: int,
               chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A split of any size streamed in chunks of `chunk` images, in file order (see
    ImageFolderDataset.chunks); the folder is scanned at once, so layout errors raise here."""
    return ImageFolderDataset(root, split, resolution).chunks(chunk)


class ImageSource:
    """Training images by index with a random horizontal flip per sample.

    Small splits are held in memory; large ones (ImageNet) are decoded per batch.
    """

    IN_MEMORY_LIMIT = 50_000

    def __init__(self, root: str | Path, split: str, resolution: int):
        self.dataset = ImageFolderDataset(root, split, resolution)
        self.images: torch.Tensor | None = None
        if len(self.dataset) <= self.IN_MEMORY_LIMIT:
            self.images = torch.stack([self.dataset[i][0] for i in range(len(self.dataset))])
        self.labels = torch.tensor(self.dataset.index.labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, idx: torch.Tensor, generator: torch.Generator,
            flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is not None:
            x = self.images[idx]
        else:
            x = torch.stack([self.dataset[int(i)][0] for i in idx])
        if flip:
            f = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]

"""Image folders in the ImageNet layout: <root>/<split>/<class>/<image>.

The same reader serves the shipped digits and ILSVRC train/val folders. Images are converted to
RGB (greyscale, palette and RGBA are accepted) and ADM-centre-cropped to the configured
resolution.

`prepare` owns the dataset folder (data.root): it puts the digits there, or a link to
data.source, replacing what it put there before; a folder it did not make is never replaced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rae_core.errors import DataError
from rae_core.train.sampler import per_sample

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
PREPARED = "dataset.json"  # the summary inside a folder prepare materialised: its mark


def _remove(path: Path) -> None:
    """Delete a link (never what it points at), a file or a folder, where there is one."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _made_by_prepare(root: Path) -> bool:
    try:
        return "dataset" in json.loads((root / PREPARED).read_text())
    except (OSError, ValueError, TypeError):
        return False


def staging(root: Path, what: str) -> Path:
    """Where the next content of the dataset folder `root` is made, beside it and emptied of an
    interrupted attempt. Refuses, before anything is written, to replace a file or folder that
    prepare did not make with `what`."""
    if root.exists() and not root.is_symlink() and not _made_by_prepare(root):
        raise DataError(f"{root}: not made by `rae stage prepare`, so it is not replaced by "
                        f"{what}; move it away or set data.root to another path (to use it as "
                        f"it is: data.dataset=folder data.source={root})")
    # leftovers of an interrupted swap are prepare's own: a link or a folder it made
    for leftover in (root.with_name(root.name + ".tmp"), root.with_name(root.name + ".old")):
        _remove(leftover)
    root.parent.mkdir(parents=True, exist_ok=True)
    return root.with_name(root.name + ".tmp")


def swap_in(new: Path, root: Path) -> None:
    """Put `new` (made at `staging(root)`) at `root`. A link replaces a link, and anything an
    empty place, in one rename; otherwise (a rename puts nothing over a folder, nor a folder
    over a link) what is there goes aside first and is removed after: `root` is missing only
    between two renames, and the next `staging` clears what a crash there left aside."""
    old = root.with_name(root.name + ".old")
    present = root.is_symlink() or root.exists()
    if present and not (root.is_symlink() and new.is_symlink()):
        os.replace(root, old)
    os.replace(new, root)
    _remove(old)


def link_folder(source: Path, root: Path) -> None:
    """Make the dataset folder `root` a link to the image folder `source`."""
    tmp = staging(root, f"a link to {source}")
    tmp.symlink_to(source, target_is_directory=True)
    swap_in(tmp, root)


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


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [0, 1]."""
    return pixels.float().div_(255)


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

    def pixels(self, i: int) -> torch.Tensor:
        """Image i as uint8 (3, R, R): what __getitem__ scales to [0, 1], in a quarter of the bytes."""
        return torch.from_numpy(load_image(self.index.files[i], self.resolution).copy()).permute(2, 0, 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_unit(self.pixels(i)), self.index.labels[i]

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


MAX_IN_MEMORY = 10_000  # data.max_in_memory's default


class ImageSource:
    """Training images by index with a random horizontal flip per sample.

    Splits of at most `max_in_memory` images are decoded once and held in memory as uint8 (10,000
    images at 256 px: 2 GB); larger ones (ImageNet) are decoded per batch. `read` is the part a
    DataLoader worker can do ahead of the step (rae_core.data.loader), passing on uint8, a quarter
    of float32's bytes; `finish` scales to [0, 1] and draws from the step's generator.
    """

    def __init__(self, root: str | Path, split: str, resolution: int,
                 max_in_memory: int = MAX_IN_MEMORY):
        self.dataset = ImageFolderDataset(root, split, resolution)
        self.images: torch.Tensor | None = None
        if len(self.dataset) <= max_in_memory:
            self.images = torch.stack([self.dataset.pixels(i) for i in range(len(self.dataset))])
        self.labels = torch.tensor(self.dataset.index.labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (B, 3, R, R) and labels (B,) of `idx`, unflipped."""
        if self.images is not None:
            return self.images[idx], self.labels[idx]
        return torch.stack([self.dataset.pixels(int(i)) for i in idx]), self.labels[idx]

    def finish(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
               flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, R, R) in [0, 1], each mirrored with probability 1/2 where `flip`."""
        x = to_unit(x)
        if flip:
            f = per_sample(generator, len(x), lambda m, g: torch.rand(m, generator=g)) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        return x, y

    def get(self, idx: torch.Tensor, generator: torch.Generator,
            flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish(*self.read(idx), generator, flip)

"""Images/s of the training loader at 256 px against the number of DataLoader worker processes.

The folder is made from the shipped photos (rae_core.data.photos): their 1,800 training crops
(32 px), each upscaled to 256 px as JPEG (quality 90, bicubic: what a 256 px run's ADM crop
does to them) with --format jpeg, or kept as the 32 px PNGs, which the loader's crop then
upscales, with --format png. The split is read lazily (data.max_in_memory=0), as ImageNet's is:
every batch is decoded when it is read. For each worker count the loader reads --steps batches
after one warm-up batch (which includes the workers' start); the median of --repeat runs is
printed, runs alternating between worker counts so load changes hit each alike. The reading
process runs torch on --threads threads (workers always on one, as DataLoader sets them).

--extract times extract's reading instead (rae_core.data.loader.range_batches over the split
in file order), --gpu-decode with the JPEGs decoded on the GPU (one batch per call, synchronised).

    .venv/bin/python bench/loader_speed.py [--workers 0 1 2] [--repeat 5] [--format jpeg]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from rae_core.config import from_dict
from rae_core.data.folder import ImageFolderDataset, ImageSource
from rae_core.data.loader import StepLoader, range_batches
from rae_core.data.photos import materialise_photos
from rae_core.train.sampler import step_seed


def make_folder(root: Path, fmt: str, size: int) -> Path:
    photos = root / "photos"
    if not photos.exists():
        materialise_photos(photos, val_fraction=0.2, seed=0)
    if fmt == "png":
        return photos
    out = root / f"photos-{size}"
    if not out.exists():
        for src in sorted((photos / "train").rglob("*.png")):
            dst = out / "train" / src.parent.name / f"{src.stem}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                im.convert("RGB").resize((size, size), Image.BICUBIC).save(dst, quality=90)
    return out


def train_rate(source: ImageSource, workers: int, batch: int, steps: int, prefetch: int) -> float:
    loader = StepLoader(source, batch, 0, steps + 1, workers=workers, prefetch=prefetch,
                        pin=torch.cuda.is_available())
    loader.get(0, torch.Generator().manual_seed(step_seed(0, 0)))  # warm-up: workers start
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loader.get(step, torch.Generator().manual_seed(step_seed(0, step)))
    return batch * steps / (time.perf_counter() - t0)


def extract_rate(ds: ImageFolderDataset, workers: int, batch: int, prefetch: int,
                 gpu: bool) -> float:
    cfg = from_dict({"data": {"loader": {"workers": workers, "prefetch": prefetch}},
                     "extract": {"gpu_decode": gpu}, "ray": {"use_gpu": torch.cuda.is_available()}})
    batches = range_batches(ds, 0, len(ds), batch, cfg)
    next(batches)  # warm-up: workers start (and nvJPEG's first call)
    t0, n = time.perf_counter(), 0
    for x, _ in batches:
        n += len(x)
    if gpu:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--format", choices=["jpeg", "png"], default="jpeg")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--extract", action="store_true")
    ap.add_argument("--gpu-decode", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the reading process (a Ray worker of the tiny preset has one)")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "rae-loader-bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = make_folder(args.root, args.format, args.resolution)
    if args.extract:
        run = partial(extract_rate, ImageFolderDataset(folder, "train", args.resolution),
                      batch=args.batch, prefetch=args.prefetch, gpu=args.gpu_decode)
    else:
        run = partial(train_rate, ImageSource(folder, "train", args.resolution, max_in_memory=0),
                      batch=args.batch, steps=args.steps, prefetch=args.prefetch)
    rates: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(args.repeat):
        for w in args.workers:
            rates[w].append(run(workers=w))
    base = statistics.median(rates[args.workers[0]])
    for w, r in rates.items():
        med = statistics.median(r)
        print(json.dumps({"workers": w, "images_per_s": round(med, 1),
                          "speedup": round(med / base, 2), "runs": [round(x, 1) for x in r]}))


if __name__ == "__main__":
    main()

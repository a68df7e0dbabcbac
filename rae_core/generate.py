"""The sample stage: N images per class from the EMA generator, decoded by the decoder.

The requested images are cut into fixed shards, each with its own seed, so the same
configuration yields the same images whatever the number of Ray workers; finished shards are
kept, so a killed run resumes at the first missing one. Each shard records the seconds its
sampling and decoding took (not the loading), so the stage reports the throughput of one
sampling worker, images/s, comparable between families run on the same device.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from rae_core.config import Config, from_dict
from rae_core.paths import Paths
from rae_core.store import write_json

log = logging.getLogger(__name__)


@torch.no_grad()
def draw_images(cfg: Config, index: int, labels: list[int], model, decoder, stats,
                shape: tuple[int, ...], weak=None) -> np.ndarray:
    """Shard `index` of the samples: uint8 images (n, H, W, 3) of `labels`, computed on the
    model's device (bf16 autocast there with sample.precision). The shard's noise comes from
    (sample.seed, index) on the CPU whatever the batch size and device, so re-batching gives
    the same images, and a registered model reproduces the stage's draws."""
    from rae_core import device as devices
    from rae_core.generator import sample_latents
    from rae_core.images import to_uint8

    s = cfg.sample
    here = next(model.parameters()).device
    g = torch.Generator().manual_seed(s.seed * 1_000_003 + index)
    y = torch.tensor(labels, dtype=torch.long)
    noise = torch.randn((len(y), *shape), generator=g)
    images = []
    for i in range(0, len(y), s.batch_size):
        sl = slice(i, i + s.batch_size)
        with devices.autocast(here, s.precision == "bf16"):
            z = sample_latents(cfg, model, y[sl].to(here), shape, noise[sl].to(here),
                               weak_model=weak, generator=g)
            x = decoder(stats.denormalize(z))
        images.append(to_uint8(x))  # (b, H, W, 3) on the CPU
    return np.concatenate(images)


def _shard(cfg_dict: dict, root: str, index: int, labels: list[int], path: str) -> str:
    from rae_core import device as devices
    from rae_core.autoencoder import load_decoder, load_encoder, load_stats
    from rae_core.generator import load_generator
    from rae_core.released import configured_generator

    cfg, paths = from_dict(cfg_dict), Paths.at(root)
    s, here = cfg.sample, devices.of(cfg)
    encoder = load_encoder(cfg, paths)  # its latent shape and weights' identity: no compute
    stats = load_stats(cfg, paths, encoder)
    decoder = load_decoder(cfg, paths, encoder, here)
    shape = tuple(encoder.latent_shape)
    model = configured_generator(cfg, paths, shape).to(here)  # ema.pt or generator.weights
    weak = load_generator(paths.dataset(s.weak_model), shape, cfg.data.num_classes).to(here) \
        if s.guidance == "autoguidance" else None
    t0 = time.perf_counter()
    arr = draw_images(cfg, index, labels, model, decoder, stats, shape, weak)
    seconds = time.perf_counter() - t0
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.npz")
    np.savez(tmp, images=arr, labels=np.asarray(labels), seconds=seconds,
             device=device_name(next(model.parameters()).device))
    tmp.replace(path)
    return path


def save_samples(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The layout of ADM's evaluator and its labelled reference batches: `arr_0` the uint8
    (N, H, W, 3) images, `arr_1` their class labels."""
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, arr_0=images, arr_1=labels)
    tmp.replace(path)


def load_samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


def run(cfg: Config, paths: Paths) -> dict:
    from rae_core.generator import SECTIONS
    from rae_core.images import grid, save_png
    from rae_core.released import generator_file
    from rae_core.sampling import balanced_labels
    from rae_core.throughput import report
    from rae_core.train.runner import map_shards

    s, out = cfg.sample, paths.samples_dir
    labels = balanced_labels(s.num_per_class, cfg.data.num_classes).tolist()
    key = {"sample": cfg.to_dict()["sample"], "generator": cfg.fingerprint(*SECTIONS),
           "decoder": cfg.fingerprint("autoencoder", "decoder"), "model_mtime":
           generator_file(cfg, paths).stat().st_mtime_ns}
    marker = out / "shards.key.json"
    if marker.exists() and json.loads(marker.read_text()) != key:
        for old in out.glob("shard-*.npz"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, key)
    shards = [labels[i: i + s.shard_size] for i in range(0, len(labels), s.shard_size)]
    names = [out / f"shard-{i:05d}.npz" for i in range(len(shards))]
    todo = [(cfg.to_dict(), str(paths.root), i, lab, str(p))
            for i, (lab, p) in enumerate(zip(shards, names, strict=True)) if not p.exists()]
    map_shards(_shard, todo, cfg, desc="sample")
    parts = [np.load(p) for p in names]
    images = np.concatenate([p["images"] for p in parts])
    ys = np.concatenate([p["labels"] for p in parts])
    save_samples(out / "samples.npz", images, ys)
    _write_pngs(images, ys, out / "png")
    per_class = min(s.num_per_class, 10)
    pick = np.concatenate([np.flatnonzero(ys == c)[:per_class]
                           for c in range(min(cfg.data.num_classes, 20))])
    save_png(grid(images[pick], nrow=per_class), out / "grid.png", upscale=2)
    seconds = float(sum(float(p["seconds"]) for p in parts))
    speed = {"images_per_s": len(images) / seconds, "sampling_s": seconds,
             "device": ", ".join(sorted({str(p["device"]) for p in parts}))}
    write_json(out / "throughput.json", speed)
    report("sample", speed)
    return {"images": int(len(images)), "shards": len(shards),
            "reused_shards": len(shards) - len(todo), **speed}


def device_name(device: torch.device) -> str:
    """What a shard ran on: the GPU's name, or the CPU's with its thread count."""
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} cpu x{torch.get_num_threads()}"


def _write_pngs(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    from PIL import Image
    from tqdm import tqdm

    for i, (im, y) in enumerate(tqdm(zip(images, labels, strict=True), total=len(images),
                                     desc="PNG files", unit="img", disable=None, leave=False)):
        d = folder / str(int(y))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i:06d}.png")

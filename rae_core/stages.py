"""Every pipeline stage as `stage(cfg, paths) -> outputs`; the flows and the CLI call these.

Order: prepare -> pretrain-encoder -> stats -> extract -> train-decoder -> train-generator ->
sample -> evaluate. Training stages run on Ray Train; stats, extract and sample fan out as Ray
tasks. What a stage does for each family (autoencoder.kind, generator.kind) is resolved in
rae_core.autoencoder and rae_core.generator; the stages themselves are the same for all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from rae_core.config import Config
from rae_core.paths import Paths
from rae_core.store import write_json

log = logging.getLogger(__name__)


def prepare(cfg: Config, paths: Paths) -> dict:
    """Make data.root hold exactly the data the config names: the digits or photos materialised
    there, or a link to data.source, replacing what prepare put there before (never a folder of
    the user's); then validate it (ImageNet layout). On a cluster, a worker node must see the
    same folder."""
    from rae_core.data.digits import materialise_digits
    from rae_core.data.folder import link_folder, validate_folder
    from rae_core.data.photos import PER_CLASS, PHOTOS_SIZE, materialise_photos

    root = paths.dataset(cfg.data.root)
    if cfg.data.dataset == "photos":  # stored at the working size where it exceeds 32 px
        materialise_photos(root, cfg.data.val_fraction, cfg.seed,
                           max(cfg.data.resolution, PHOTOS_SIZE),
                           cfg.data.per_class or PER_CLASS)
    elif cfg.data.dataset == "digits":
        materialise_digits(root, cfg.data.val_fraction, cfg.seed)
    elif (src := paths.dataset(cfg.data.source)) != root:  # a source at data.root: used in place
        validate_folder(src, cfg.data.num_classes, check_files=False)  # layout; files below
        link_folder(src, root)
    summary = validate_folder(root, cfg.data.num_classes, resolution=cfg.data.resolution)
    # what data.root holds: tells apart datasets of the same layout
    summary["source"] = cfg.data.source if cfg.data.dataset == "folder" else cfg.data.dataset
    from rae_core.train.runner import check_dataset_on_workers

    setting = f"data.source={cfg.data.source}" if cfg.data.source else f"data.root={cfg.data.root}"
    check_dataset_on_workers(root, setting, cfg)
    write_json(root.parent / f"{root.name}.json", summary)
    return {"train_images": summary["train"], "val_images": summary["val"],
            "classes": len(summary["classes"])}


def pretrain_encoder(cfg: Config, paths: Paths) -> dict:
    """MAE pretraining of a small representation encoder (rae), or the whole autoencoder: KL
    (vae) or multi-scale VQ (hybrid-vq)."""
    if cfg.autoencoder.kind in ("vae", "hybrid-vq"):
        from rae_core.train import pretrain_autoencoder as stage
    else:
        from rae_core.train import pretrain_encoder as stage
    return stage.run(cfg, paths)


def _encoded_batches(cfg: Config, paths: Paths, start: int, end: int, both_flips: bool,
                     residual: bool, batch_size: int):
    """Raw latents of training images [start, end), `batch_size` at a time, on the device this
    process computes on (bf16 autocast there with extract.precision: stats and extract encode
    alike, so the statistics describe the latents the generator trains on): (n, 2, C, H, W) or
    (n, C, H, W), and labels (n,) on the CPU; with `residual`, what a hybrid-vq tokenizer's
    discrete scales miss of them instead."""
    from rae_core import device
    from rae_core.autoencoder import load_encoder
    from rae_core.data.folder import ImageFolderDataset
    from rae_core.data.loader import range_batches

    here = device.of(cfg)
    encoder = load_encoder(cfg, paths, here)
    ds = ImageFolderDataset(paths.dataset(cfg.data.root), "train", cfg.data.resolution)
    for x, y in range_batches(ds, start, end, batch_size, cfg):
        x = x.to(here, non_blocking=True)
        with device.autocast(here, cfg.extract.precision == "bf16"):
            zs = [encoder.encode(v) for v in ((x, x.flip(-1)) if both_flips else (x,))]
            if residual:
                zs = [encoder.quantizer.residual(z) for z in zs]
        yield (torch.stack(zs, 1) if both_flips else zs[0]), y


def _encode_range(cfg_dict: dict, root: str, start: int, end: int, both_flips: bool,
                  residual: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All latents of training images [start, end) and their labels, on the CPU."""
    from rae_core.config import from_dict

    cfg = from_dict(cfg_dict)
    zs, ys = [], []
    for z, y in _encoded_batches(cfg, Paths.at(root), start, end, both_flips, residual,
                                 cfg.extract.batch_size):
        zs.append(z.cpu())
        ys.append(y)
    return torch.cat(zs), torch.cat(ys)


def _stats_shard(cfg_dict: dict, root: str, start: int, end: int) -> dict:
    """LatentStats of training images [start, end), reduced batch by batch on the device (the
    latents of a shard are never all held at once)."""
    from rae_core.config import from_dict
    from rae_core.encoders import LatentStats

    cfg = from_dict(cfg_dict)
    hflip = cfg.data.hflip
    st = None
    # hybrid-vq: the generator reads f as it is; HART's head learns the residual, whose scale
    # is what the statistics are for
    for z, _ in _encoded_batches(cfg, Paths.at(root), start, end, both_flips=hflip,
                                 residual=cfg.autoencoder.kind == "hybrid-vq",
                                 batch_size=cfg.stats.batch_size):
        z = z.flatten(0, 1) if hflip else z  # (n, C, H, W)
        st = st or LatentStats(tuple(z.shape[1:]))
        st.update(z)
    return st.state_dict()


def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def stats(cfg: Config, paths: Paths) -> dict:
    """Exact per-element mean/var of the latents of all training images (and their mirror
    images where data.hflip augments the training data). A VAE's latents are normalised by
    one scale, 1 / the pooled std derived from the same statistics (unless given); a hybrid-vq
    tokenizer's statistics are those of its residual, which set HART's residual scale."""
    from rae_core.autoencoder import load_encoder, residual_scale, stats_identity
    from rae_core.data.folder import scan_split
    from rae_core.encoders import LatentStats
    from rae_core.train.runner import map_shards

    n = len(scan_split(paths.dataset(cfg.data.root), "train"))
    parts = map_shards(_stats_shard, [(cfg.to_dict(), str(paths.root), a, b)
                                      for a, b in _ranges(n, cfg.stats.shards)], cfg)
    total = LatentStats.from_state_dict(parts[0])
    for p in parts[1:]:
        total.merge(LatentStats.from_state_dict(p))
    encoder = load_encoder(cfg, paths)
    total.save(paths.stats_file, stats_identity(cfg, encoder))
    var = total.var
    out = {"count": int(total.count), "mean_abs_mean": float(total.mean.abs().mean()),
           "mean_var": float(var.mean()), "min_var": float(var.min())}
    if cfg.autoencoder.kind == "vae":
        out["latent_scale"] = cfg.autoencoder.scale or 1.0 / total.global_std()
    if cfg.autoencoder.kind == "hybrid-vq":
        out["residual_rms"] = float((var + total.mean ** 2).mean().sqrt())
        out["residual_scale"] = residual_scale(cfg, paths, encoder)
    return out


def _extract_shard(cfg_dict: dict, root: str, start: int, end: int, path: str) -> str:
    from rae_core.config import from_dict
    from rae_core.store import atomic_save

    cfg = from_dict(cfg_dict)
    z, y = _encode_range(cfg_dict, root, start, end, both_flips=True)
    atomic_save({"latents": z.to(getattr(torch, cfg.extract.dtype)), "labels": y,
                 "start": start}, path, checksum=True)
    return path


def extract(cfg: Config, paths: Paths) -> dict:
    """Latents of every training image under both flips, in shards; finished shards are kept,
    damaged ones (checksum or loading) re-made."""
    from rae_core.autoencoder import load_encoder, stats_identity
    from rae_core.data.folder import scan_split
    from rae_core.data.latents import MANIFEST, reusable, shard_name
    from rae_core.throughput import figures, report
    from rae_core.train.runner import map_shards

    out = paths.latents_dir
    encoder = load_encoder(cfg, paths)
    identity = stats_identity(cfg, encoder)
    if not cfg.extract.enabled:
        write_json(out / MANIFEST, {"identity": identity, "shards": [], "disabled": True})
        return {"shards": 0, "skipped": True}
    n = len(scan_split(paths.dataset(cfg.data.root), "train"))
    size = cfg.extract.shard_size
    ranges = [(a, min(a + size, n)) for a in range(0, n, size)]
    key = {"identity": identity, "shard_size": size, "dtype": cfg.extract.dtype, "count": n}
    if cfg.extract.precision == "bf16" and cfg.ray.use_gpu:  # other latents than fp32's
        key["precision"] = "bf16"
    marker = out / "shards.key.json"
    import json

    if marker.exists() and json.loads(marker.read_text()) != key:
        for old in out.glob("shard-*.pt*"):  # and their checksums
            old.unlink()
    write_json(marker, key)
    todo = [(cfg.to_dict(), str(paths.root), a, b, str(out / shard_name(i)))
            for i, (a, b) in enumerate(ranges) if not reusable(out / shard_name(i))]
    if len(todo) < len(ranges):
        log.info("extract: %d of %d shards already done", len(ranges) - len(todo), len(ranges))
    t0 = time.perf_counter()
    map_shards(_extract_shard, todo, cfg)
    # images encoded (each under both flips) per second, with the workers' start-up
    speed = figures(sum(t[3] - t[2] for t in todo), time.perf_counter() - t0)
    write_json(out / MANIFEST, {"identity": identity, "count": n,
                                "shards": [shard_name(i) for i in range(len(ranges))]})
    report("extract", speed)
    return {"shards": len(ranges), "reused_shards": len(ranges) - len(todo), "images": n,
            **speed}


def train_decoder(cfg: Config, paths: Paths) -> dict:
    from rae_core.train import decoder as stage

    return stage.run(cfg, paths)


def train_generator(cfg: Config, paths: Paths) -> dict:
    """The generator, then (where generator.weak names a model) AutoGuidance's weak model on
    the same latents with the same settings, its own model, steps and schedule scaled to them,
    into models/generator/weak/ema.pt; the weak model's figures come back as weak_*."""
    from rae_core.config import from_dict
    from rae_core.train import generator as stage

    out = stage.run(cfg, paths)
    g, w = cfg.generator, cfg.generator.weak
    if w.model is None:
        return out
    scale = w.steps / g.steps
    section = {**g.model_dump(), "model": w.model, "steps": w.steps, "hidden": w.hidden,
               "depth": w.depth, "heads": w.heads, "head_hidden": w.head_hidden,
               "warmup_steps": round(g.warmup_steps * scale),
               "decay_start_step": round(g.decay_start_step * scale), "weak": {}}
    weak = stage.run(from_dict({**cfg.to_dict(), "generator": section}), paths,
                     "train-generator-weak", paths.generator_dir / "weak")
    return out | {f"weak_{k}": v for k, v in weak.items()}


def sample(cfg: Config, paths: Paths) -> dict:
    from rae_core import generate

    return generate.run(cfg, paths)


def _evaluate(cfg_dict: dict, root: str) -> dict:
    from rae_core import evaluation
    from rae_core.config import from_dict

    return evaluation.run(from_dict(cfg_dict), Paths.at(root))


def evaluate(cfg: Config, paths: Paths) -> dict:
    """On a Ray worker of the run, as the other stages compute (its GPU when ray.use_gpu), not
    in the driver."""
    from rae_core.train.runner import run_on_worker

    return run_on_worker(_evaluate, cfg.to_dict(), str(paths.root), cfg=cfg,
                         log_to=paths.metrics_log("evaluate"))


STAGES: dict[str, Callable[[Config, Paths], dict]] = {
    "prepare": prepare,
    "pretrain-encoder": pretrain_encoder,
    "stats": stats,
    "extract": extract,
    "train-decoder": train_decoder,
    "train-generator": train_generator,
    "sample": sample,
    "evaluate": evaluate,
}

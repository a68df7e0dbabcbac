"""The evaluate stage: gFID, precision/recall, class accuracy (and IS with Inception) of the
samples, and rFID/PSNR of the decoder on the validation split.

Every FID carries the name of the extractor that produced it. The reference statistics of the
training set (and an evenly spread subset of its features for precision/recall) are computed
once per (dataset, extractor) and cached under models/reference.

Splits are streamed in chunks of CHUNK images and features folded into running statistics, so
memory does not grow with the dataset: ImageNet's 1.28M training images are ~1 TB as float32
and their 2048-d Inception features ~21 GB in float64.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rae_core import device as devices
from rae_core.config import Config, from_dict
from rae_core.data.folder import ImageFolderDataset, load_split
from rae_core.generate import load_samples
from rae_core.metrics import (
    DomainExtractor,
    FeatureStats,
    InceptionExtractor,
    StatsAccumulator,
    frechet_distance,
    inception_score,
    load_classifier,
    precision_recall,
    psnr,
    save_classifier,
    train_domain_classifier,
)
from rae_core.metrics.adm import read_reference
from rae_core.metrics.domain import predict
from rae_core.metrics.features import as_float_images
from rae_core.paths import Paths
from rae_core.store import write_json

log = logging.getLogger(__name__)

CHUNK = 500  # images in memory at once: ~0.4 GB as float32 at 256 px
# Reference features kept for precision/recall: the paper's protocol compares 50k samples with
# 50k real images; more would cost O(N^2) distances and ~0.8 GB per 50k Inception features.
MAX_PR_REFERENCE = 50_000


def _dataset_key(cfg: Config) -> str:
    return cfg.fingerprint("data", "seed")


def domain_classifier(cfg: Config, paths: Paths):
    """The domain classifier of this dataset, trained once and kept as an artifact.

    Training holds both splits in memory: the domain extractor exists for the small shipped
    datasets only (ImageNet runs use Inception).
    """
    path = (paths.reference_dir /
            f"classifier-{_dataset_key(cfg)}-e{cfg.evaluate.classifier_epochs}.pt")
    if path.exists():
        return load_classifier(path)
    root = paths.dataset(cfg.data.root)
    train = load_split(root, "train", cfg.data.resolution)
    val = load_split(root, "val", cfg.data.resolution)
    model, acc = train_domain_classifier(train[0], train[1], val[0], val[1],
                                         epochs=cfg.evaluate.classifier_epochs, batch_size=128,
                                         lr=2e-3, seed=cfg.seed)
    save_classifier(model, path, {"val_accuracy": acc, "dataset": _dataset_key(cfg)})
    return load_classifier(path)


def build_extractor(cfg: Config, paths: Paths, device: torch.device | str = "cpu"):
    """(feature extractor, domain classifier or None) of the configured extractor, computing
    on `device` in batches of evaluate.batch_size. The domain classifier is trained on the CPU,
    so its feature space (and name) is the same whichever device evaluates."""
    if cfg.evaluate.extractor == "inception":
        return InceptionExtractor(cfg.evaluate.inception_weights, device,
                                  cfg.evaluate.batch_size), None
    extractor = DomainExtractor(domain_classifier(cfg, paths), cfg.evaluate.batch_size, device)
    return extractor, extractor.classifier


@dataclass(frozen=True)
class Reference:
    """Training-set statistics of one extractor, and every `stride`-th training image's features
    (at most MAX_PR_REFERENCE, in file order) as the real set of precision/recall; or those of
    an ADM reference batch (evaluate.reference), whose precision/recall features exist only when
    the file holds its images. `name` is the reference set as the leaderboard names it."""

    stats: FeatureStats
    pr_features: np.ndarray | None
    name: str = "train split"

    def save(self, path: Path) -> None:
        self.stats.save(path, pr_features=self.pr_features)

    @classmethod
    def load(cls, path: Path) -> Reference:
        with np.load(path, allow_pickle=False) as z:
            pr_features = z["pr_features"]
        return cls(FeatureStats.load(path), pr_features)


def yardstick(cfg_dict: dict, root: str) -> None:
    """What every evaluation of this dataset scores with, computed and cached ahead of the
    evaluate stage on this process's device: the domain classifier and the training split's
    reference features. A dict and a path as arguments, so a Ray task can take them."""
    cfg, paths = from_dict(cfg_dict), Paths.at(root)
    extractor, _ = build_extractor(cfg, paths, devices.of(cfg))
    reference(cfg, paths, extractor)


def pr_stride(n: int, max_pr: int) -> int:
    """The smallest k for which every k-th of n images is at most max_pr images."""
    return max(1, -(-n // max_pr))


def reference_from_split(root: str | Path, resolution: int, extractor, chunk: int = CHUNK,
                         max_pr: int = MAX_PR_REFERENCE) -> Reference:
    """Stream the training split through the extractor into a Reference."""
    dataset = ImageFolderDataset(root, "train", resolution)
    stride = pr_stride(len(dataset), max_pr)
    log.info("reference statistics (%s): %d training images in chunks of %d, every %d-th kept "
             "for precision/recall", extractor.name, len(dataset), chunk, stride)
    acc, kept, start = StatsAccumulator(extractor.name), [], 0
    bar = tqdm(total=len(dataset), desc="reference features", unit="img", disable=None,
               leave=False)
    for images, _ in dataset.chunks(chunk):
        feats = extractor(images)
        acc.update(feats)
        kept.append(feats[(-start) % stride::stride])  # global indices 0, stride, 2 stride, ...
        start += len(images)
        bar.update(len(images))
    bar.close()
    return Reference(acc.stats(), np.concatenate(kept))


def reference(cfg: Config, paths: Paths, extractor) -> Reference:
    """The cached Reference of this dataset and extractor, computed on first use; that of the
    ADM batch file evaluate.reference when one is given."""
    if cfg.evaluate.reference:
        return Reference(*read_reference(cfg.evaluate.reference, extractor, paths.reference_dir))
    name = extractor.name.replace(":", "-").replace("/", "-")
    path = (paths.reference_dir /
            f"train-reference-{_dataset_key(cfg)}-{name}-pr{MAX_PR_REFERENCE}.npz")
    if path.exists():
        return Reference.load(path)
    ref = reference_from_split(paths.dataset(cfg.data.root), cfg.data.resolution, extractor)
    ref.save(path)  # atomic: temporary file, then rename
    return ref


def reconstructor(cfg: Config, paths: Paths, batch: int, discrete: bool = False,
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images -> their reconstructions through the frozen encoder and trained decoder; with
    `discrete`, a hybrid-vq tokenizer's from its discrete tokens alone. Computed on this
    process's device `batch` images at a time (bf16 autocast with evaluate.precision), returned
    in fp32 on the CPU, where PSNR and the seam energies reduce them in float64."""
    from rae_core.autoencoder import load_decoder, load_encoder

    here = devices.of(cfg)
    encoder = load_encoder(cfg, paths, here)
    decoder = load_decoder(cfg, paths, encoder, here)

    def latent(images: torch.Tensor) -> torch.Tensor:
        z = encoder.encode(images)
        return decoder.discrete(z) if discrete else z

    @torch.no_grad()
    def one(images: torch.Tensor) -> torch.Tensor:
        with devices.autocast(here, cfg.evaluate.precision == "bf16"):
            out = decoder(latent(images.to(here)))
        return out.float().clamp(0, 1).cpu()

    def reconstruct(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([one(images[i: i + batch]) for i in range(0, len(images), batch)])

    return reconstruct


def sample_metrics(images: np.ndarray, labels: np.ndarray, extractor, ref: Reference, clf,
                   pr_k: int, logits: bool, chunk: int = CHUNK) -> dict:
    """gFID, precision/recall, class accuracy (domain) and IS (`logits`: Inception) of uint8
    (N, H, W, 3) samples, converted to float and scored `chunk` images at a time."""
    acc, feats, scores, correct = StatsAccumulator(extractor.name), [], [], 0
    for i in tqdm(range(0, len(images), chunk), desc="sample features", unit="chunk",
                  disable=None, leave=False):
        x = as_float_images(images[i: i + chunk])
        feats.append(extractor(x))
        acc.update(feats[-1])
        if logits:
            scores.append(extractor.logits(x))
        if clf is not None:
            correct += int((predict(clf, x) == labels[i: i + chunk]).sum())
    m: dict = {"fid": frechet_distance(ref.stats, acc.stats()), "num_samples": len(images),
               "extractor": extractor.name, "reference": ref.name}
    if ref.pr_features is not None:  # an ADM batch of statistics only has no real features
        m["precision"], m["recall"] = precision_recall(ref.pr_features, np.concatenate(feats),
                                                       k=pr_k)
    if clf is not None:
        m["class_accuracy"] = correct / len(images)
    if logits:
        m["inception_score"], m["inception_score_std"] = inception_score(np.concatenate(scores))
    return m


def seam_energies(images: torch.Tensor, period: int) -> np.ndarray:
    """Sums and counts of the squared differences between neighbouring pixels (rows and
    columns) across the boundaries of a `period`-pixel grid and inside its cells:
    [seam sum, seam count, inside sum, inside count]."""
    x = images.double()
    seam, inside = [0.0, 0], [0.0, 0]
    for d in (x.diff(dim=-1), x.diff(dim=-2).transpose(-1, -2)):  # columns j -> j + 1, then rows
        sq = d.pow(2)
        at = (torch.arange(1, sq.shape[-1] + 1) % period) == 0
        for acc, cols in ((seam, sq[..., at]), (inside, sq[..., ~at])):
            acc[0] += float(cols.sum())
            acc[1] += cols.numel()
    return np.array([*seam, *inside], dtype=np.float64)


def seam_ratio(energies: np.ndarray) -> float:
    """Mean squared neighbour difference across grid boundaries over that inside the cells: ~1
    for natural images, large where a patch decoder leaves its grid visible."""
    seam_sum, seam_n, inside_sum, inside_n = energies
    if inside_sum == 0:  # flat cells: no texture to compare the seams with
        return 1.0 if seam_sum == 0 else float("inf")
    return float((seam_sum / seam_n) / (inside_sum / inside_n))


def reconstruction_metrics(root: str | Path, resolution: int, extractor,
                           reconstruct: Callable[[torch.Tensor], torch.Tensor], clf,
                           chunk: int = CHUNK, seam_period: int = 8) -> dict:
    """rFID, mean per-image PSNR and the seam ratio on the decoder's `seam_period`-pixel patch
    grid of the reconstructions of the validation split (the real images' beside it, and the
    domain classifier's accuracy on them), streamed `chunk` images at a time."""
    real, recon = StatsAccumulator(extractor.name), StatsAccumulator(extractor.name)
    psnr_sum, correct = 0.0, 0
    real_seams, recon_seams = np.zeros(4), np.zeros(4)
    val = ImageFolderDataset(root, "val", resolution)
    bar = tqdm(total=len(val), desc="reconstructions", unit="img", disable=None, leave=False)
    for images, labels in val.chunks(chunk):
        recs = reconstruct(images)
        real.update(extractor(images))
        recon.update(extractor(recs))
        psnr_sum += psnr(recs, images) * len(images)
        real_seams += seam_energies(images, seam_period)
        recon_seams += seam_energies(recs, seam_period)
        if clf is not None:
            correct += int((predict(clf, images) == labels.numpy()).sum())
        bar.update(len(images))
    bar.close()
    m = {"rfid": frechet_distance(real.stats(), recon.stats()), "recon_psnr": psnr_sum / real.n,
         "recon_seam_ratio": seam_ratio(recon_seams), "real_seam_ratio": seam_ratio(real_seams)}
    if clf is not None:
        m["classifier_val_accuracy"] = correct / real.n
    return m


def fid_curve(cfg: Config, paths: Paths, extractor, ref: FeatureStats) -> list[dict]:
    """FID of a small balanced sample from every saved EMA checkpoint of this configuration,
    sampled and decoded on this process's device (bf16 autocast with evaluate.precision).

    On the CPU with Ray running (evaluate is a Ray task), the checkpoints are scored as Ray
    tasks of one thread each, side by side on the run's cores: every point is computed alike
    either way (its own seeded draws), so only the wall time changes. On a GPU, in turn here.
    """
    from rae_core.train.generator import checkpoint_dir

    if cfg.evaluate.curve_per_class == 0:
        return []
    ckpts = sorted(checkpoint_dir(cfg, paths).glob("ema-step*.pt"))
    if len(ckpts) > 1 and not cfg.ray.use_gpu and _ray_running():
        from rae_core.train.runner import map_shards

        args = [(cfg.to_dict(), str(paths.root), str(c), ref) for c in ckpts]
        return map_shards(_curve_point_task, args, cfg, desc="FID per checkpoint")
    models = _curve_models(cfg, paths)
    return [_curve_point(cfg, models, extractor, ref, c)
            for c in tqdm(ckpts, desc="FID per checkpoint", unit="ckpt", disable=None,
                          leave=False)]


def _ray_running() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _curve_models(cfg: Config, paths: Paths) -> tuple:
    """(device, latent shape, latent statistics, decoder) that every curve point uses."""
    from rae_core.autoencoder import load_decoder, load_encoder, load_stats

    here = devices.of(cfg)
    encoder = load_encoder(cfg, paths, here)
    return (here, tuple(encoder.latent_shape), load_stats(cfg, paths, encoder),
            load_decoder(cfg, paths, encoder, here))


def _curve_point_task(cfg_dict: dict, root: str, ckpt: str, ref: FeatureStats) -> dict:
    cfg, paths = from_dict(cfg_dict), Paths.at(root)
    extractor, _ = build_extractor(cfg, paths, devices.of(cfg))
    return _curve_point(cfg, _curve_models(cfg, paths), extractor, ref, Path(ckpt))


@torch.no_grad()
def _curve_point(cfg: Config, models: tuple, extractor, ref: FeatureStats, ckpt: Path) -> dict:
    """{step, fid} of one EMA checkpoint: the same labels and starting noise for every one."""
    from rae_core.generator import load_generator, sample_latents
    from rae_core.sampling import balanced_labels

    here, shape, stats, decoder = models
    s = cfg.sample
    y = balanced_labels(cfg.evaluate.curve_per_class, cfg.data.num_classes)
    noise = torch.randn((len(y), *shape), generator=torch.Generator().manual_seed(s.seed))
    model = load_generator(ckpt, shape, cfg.data.num_classes).to(here)
    g = torch.Generator().manual_seed(s.seed + 1)  # DDPM: the same draws for every step
    acc = StatsAccumulator(extractor.name)
    # Decoded and scored per batch: with 1000 classes the whole curve sample is GBs.
    for i in range(0, len(y), s.batch_size):
        sl = slice(i, i + s.batch_size)
        with devices.autocast(here, cfg.evaluate.precision == "bf16"):
            z = sample_latents(cfg, model, y[sl].to(here), shape, noise[sl].to(here),
                               guidance="cfg" if s.guidance == "cfg" else "none", generator=g)
            images = decoder(stats.denormalize(z))
        acc.update(extractor(images.float().clamp(0, 1)))
    step = int(ckpt.stem.removeprefix("ema-step"))
    return {"step": step, "fid": frechet_distance(ref, acc.stats())}


def plot_curve(curve: list[dict], extractor_name: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([c["step"] for c in curve], [c["fid"] for c in curve], marker="o")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"FID ({extractor_name})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(cfg: Config, paths: Paths) -> dict:
    """The stage in this process, on its device (stages.evaluate runs it on a Ray worker)."""
    t0 = time.perf_counter()
    extractor, clf = build_extractor(cfg, paths, devices.of(cfg))
    ref = reference(cfg, paths, extractor)
    # The samples stay one uint8 array (50k at 256 px: 9.8 GB); only chunks become float.
    images, labels = load_samples(paths.samples_dir / "samples.npz")
    m = sample_metrics(images, labels, extractor, ref, clf, cfg.evaluate.pr_k,
                       logits=cfg.evaluate.extractor == "inception")
    del images  # 9.8 GB at ImageNet scale, not needed for the decoder's metrics
    m |= reconstruction_metrics(paths.dataset(cfg.data.root), cfg.data.resolution, extractor,
                                reconstructor(cfg, paths, cfg.evaluate.batch_size), clf,
                                seam_period=cfg.decoder.patch_size)
    if cfg.autoencoder.kind == "hybrid-vq":  # HART's tokenizer ablation: tokens alone
        tokens_only = reconstruction_metrics(
            paths.dataset(cfg.data.root), cfg.data.resolution, extractor,
            reconstructor(cfg, paths, cfg.evaluate.batch_size, discrete=True), None,
            seam_period=cfg.decoder.patch_size)
        m |= {f"{k}_discrete": v for k, v in tokens_only.items()}
    speed = paths.samples_dir / "throughput.json"
    if speed.exists():  # beside FID on the leaderboard: the sample stage's images/s
        m["images_per_s"] = json.loads(speed.read_text())["images_per_s"]
    curve = fid_curve(cfg, paths, extractor, ref.stats)
    # written even when the curve is off ([]): dvc.yaml declares it, and `dvc repro` fails on
    # a declared output that is missing; a plot of an earlier run's curve does not stay
    write_json(paths.evaluate_dir / "fid_curve.json", curve)
    if curve:
        plot_curve(curve, extractor.name, paths.evaluate_dir / "fid_vs_step.png")
    else:
        (paths.evaluate_dir / "fid_vs_step.png").unlink(missing_ok=True)
    # samples evaluated per second, with the references, reconstructions and curve it made
    m["eval_images_per_s"] = len(labels) / (time.perf_counter() - t0)
    log.info("evaluate: %.1f images/s", m["eval_images_per_s"])
    write_json(paths.evaluate_dir / "metrics.json", m)
    log.info("evaluate: %s", m)
    return m

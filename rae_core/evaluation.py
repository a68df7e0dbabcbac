"""The evaluate stage: gFID, precision/recall, class accuracy (and IS with Inception) of the
samples, and rFID/PSNR of the decoder on the validation split.

Every FID carries the name of the extractor that produced it. The reference statistics of the
training set are computed once per (dataset, extractor) and cached under models/reference.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from rae_core.config import Config
from rae_core.paths import Paths
from rae_core.train.common import write_json

log = logging.getLogger(__name__)


def _dataset_key(cfg: Config) -> str:
    return cfg.fingerprint("data", "seed")


def domain_classifier(cfg: Config, paths: Paths, train, val):
    """The domain classifier of this dataset, trained once and kept as an artifact."""
    from rae_core.metrics.domain import load_classifier, save_classifier, train_domain_classifier

    path = (paths.reference_dir /
            f"classifier-{_dataset_key(cfg)}-e{cfg.evaluate.classifier_epochs}.pt")
    if path.exists():
        return load_classifier(path)
    model, acc = train_domain_classifier(train[0], train[1], val[0], val[1],
                                         epochs=cfg.evaluate.classifier_epochs, batch_size=128,
                                         lr=2e-3, seed=cfg.seed)
    save_classifier(model, path, {"val_accuracy": acc, "dataset": _dataset_key(cfg)})
    return load_classifier(path)


def build_extractor(cfg: Config, paths: Paths, train, val):
    from rae_core.metrics.features import DomainExtractor, InceptionExtractor

    if cfg.evaluate.extractor == "inception":
        return InceptionExtractor(cfg.evaluate.inception_weights), None
    clf = domain_classifier(cfg, paths, train, val)
    return DomainExtractor(clf), clf


def reference_features(cfg: Config, paths: Paths, extractor, images: torch.Tensor) -> np.ndarray:
    name = extractor.name.replace(":", "-").replace("/", "-")
    path = paths.reference_dir / f"train-features-{_dataset_key(cfg)}-{name}.npy"
    if path.exists():
        return np.load(path)
    feats = extractor(images)
    paths.reference_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, feats)
    tmp.replace(path)
    return feats


@torch.no_grad()
def reconstruct(cfg: Config, paths: Paths, images: torch.Tensor, batch: int) -> torch.Tensor:
    from rae_core.autoencoder import load_decoder, load_encoder

    encoder = load_encoder(cfg, paths)
    decoder = load_decoder(cfg, paths, encoder)
    return torch.cat([decoder(encoder.encode(images[i: i + batch])).clamp(0, 1)
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def fid_curve(cfg: Config, paths: Paths, extractor, ref: np.ndarray) -> list[dict]:
    """FID of a small balanced sample from every saved EMA checkpoint of this configuration."""
    from rae_core.autoencoder import load_decoder, load_encoder, load_stats
    from rae_core.generate import load_generator
    from rae_core.metrics import fid_from_features
    from rae_core.sampling import balanced_labels, generate
    from rae_core.train.dit import checkpoint_dir, latent_shift

    if cfg.evaluate.curve_per_class == 0:
        return []
    encoder = load_encoder(cfg, paths)
    stats, decoder = load_stats(cfg, paths, encoder), load_decoder(cfg, paths, encoder)
    shape, s = tuple(encoder.latent_shape), cfg.sample
    y = balanced_labels(cfg.evaluate.curve_per_class, cfg.data.num_classes)
    noise = torch.randn((len(y), *shape), generator=torch.Generator().manual_seed(s.seed))
    curve = []
    for ckpt in sorted(checkpoint_dir(cfg, paths).glob("ema-step*.pt")):
        model = load_generator(ckpt, shape, cfg.data.num_classes)
        z = torch.cat([generate(model, y[i: i + s.batch_size], shape, steps=s.steps,
                                method=s.sampler, shift=latent_shift(cfg, shape),
                                guidance="cfg" if s.guidance == "cfg" else "none",
                                scale=s.scale, interval=tuple(s.interval),
                                noise=noise[i: i + s.batch_size])
                       for i in range(0, len(y), s.batch_size)])
        images = decoder(stats.denormalize(z)).clamp(0, 1)
        step = int(ckpt.stem.removeprefix("ema-step"))
        curve.append({"step": step, "fid": float(fid_from_features(ref, extractor(images)))})
    return curve


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
    from rae_core.data.folder import load_split
    from rae_core.metrics import fid_from_features, precision_recall, psnr
    from rae_core.metrics.domain import class_accuracy

    root = paths.dataset(cfg.data.root)
    train = load_split(root, "train", cfg.data.resolution)
    val = load_split(root, "val", cfg.data.resolution)
    extractor, clf = build_extractor(cfg, paths, train, val)
    ref = reference_features(cfg, paths, extractor, train[0])
    data = np.load(paths.samples_dir / "samples.npz")
    samples = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float().div(255)
    labels = torch.from_numpy(data["labels"]).long()
    fake = extractor(samples)
    prec, rec = precision_recall(ref, fake, k=cfg.evaluate.pr_k)
    m: dict = {"fid": float(fid_from_features(ref, fake)), "precision": float(prec),
               "recall": float(rec), "num_samples": int(len(samples)),
               "extractor": extractor.name}
    if clf is not None:
        m["class_accuracy"] = float(class_accuracy(clf, samples, labels))
        m["classifier_val_accuracy"] = float(class_accuracy(clf, val[0], val[1]))
    if cfg.evaluate.extractor == "inception":
        from rae_core.metrics import inception_score

        m["inception_score"], m["inception_score_std"] = map(
            float, inception_score(extractor.logits(samples)))
    recs = reconstruct(cfg, paths, val[0], cfg.evaluate.batch_size)
    m["rfid"] = float(fid_from_features(extractor(val[0]), extractor(recs)))
    m["recon_psnr"] = float(psnr(recs, val[0]))
    curve = fid_curve(cfg, paths, extractor, ref)
    if curve:
        write_json(paths.evaluate_dir / "fid_curve.json", curve)
        plot_curve(curve, extractor.name, paths.evaluate_dir / "fid_vs_step.png")
    write_json(paths.evaluate_dir / "metrics.json", m)
    log.info("evaluate: %s", m)
    return m

"""rFID, gFID and IS do not depend on the evaluation batch size (users of the reference code
report rFID 1.88 / 2.12 / 3.96 at batch 512 / 256 / 128).

Where a batch size could enter: the extractor's batches (eval-mode BatchNorm, clean-fid's
resize, which is per image, an uneven last batch), the decoder's reconstruction batches
(evaluate.batch_size), the stage's chunks (features folded into float64 running statistics)
and the IS splits (over a fixed shuffle of all samples, never over batches). Each is run here
with batch sizes that divide the image count and ones that do not, through the Inception
extractor's own code on a small TorchScript network of Inception's interface (the real weights
are not on this machine) and a real ViT decoder."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rae_core import autoencoder
from rae_core.decoder import ViTDecoder
from rae_core.evaluation import Reference, reconstruction_metrics, reconstructor, sample_metrics
from rae_core.metrics import FeatureStats, InceptionExtractor, StatsAccumulator
from rae_core.paths import Paths
from rae_core.presets import load_config

RES, N_VAL, N_SAMPLES = 8, 12, 30


class TinyInception(nn.Module):
    """Inception's interface (layers -> (B, 2048, 1, 1) pool features, output = the 1008-way
    linear), with an eval-mode BatchNorm where a train-mode one would mix the batch."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(6), nn.Conv2d(3, 2048, 6),
                                    nn.BatchNorm2d(2048), nn.ReLU())
        self.output = nn.Linear(2048, 1008, bias=False)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    net = TinyInception()
    with torch.no_grad():
        net.layers[2].running_mean.normal_()
        net.layers[2].running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.script(net.eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch") / "dataset"
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", N_VAL // 2)):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(
                    root / split / f"c{c}" / f"{i}.png")
    return root


class PoolEncoder(nn.Module):
    """A fixed stand-in encoder: 2x2 average pooling, (B, 3, 8, 8) -> (B, 3, 4, 4)."""

    latent_shape = (3, 4, 4)

    def encode(self, x):
        return nn.functional.avg_pool2d(x, 2)


def _close(values, rel=1e-6):
    return all(v == pytest.approx(values[0], rel=rel) for v in values)


def test_gfid_and_is_are_the_same_for_every_batch_and_chunk_size(inception_file):
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (40, RES, RES, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, (N_SAMPLES, RES, RES, 3), dtype=np.uint8)
    runs = []
    for batch in (1, 7, 10, 30, 64):  # 7 leaves a last batch of 2; 64 exceeds the count
        ext = InceptionExtractor(inception_file, "cpu", batch_size=batch)
        ref = Reference(FeatureStats.from_features(ext(real), ext.name), ext(real))
        for chunk in (4, 500):
            runs.append(sample_metrics(samples, np.zeros(N_SAMPLES, int), ext, ref, None,
                                       pr_k=3, logits=True, chunk=chunk))
    assert len(runs) == 10 and runs[0]["fid"] > 0 and runs[0]["inception_score"] > 1
    for key in ("fid", "inception_score", "inception_score_std", "precision", "recall"):
        assert _close([r[key] for r in runs]), (key, [r[key] for r in runs])


def test_rfid_is_the_same_for_every_reconstruction_batch_and_chunk_size(inception_file, folder,
                                                                        monkeypatch):
    torch.manual_seed(0)
    dec = ViTDecoder(3, 4, 2, 32, 2, 2, 64, noise_tau=0.8).eval()  # eval: no noise augmentation
    for p in dec.parameters():
        nn.init.normal_(p, std=0.1)
    monkeypatch.setattr(autoencoder, "load_encoder", lambda cfg, paths, device="cpu":
                        PoolEncoder())
    monkeypatch.setattr(autoencoder, "load_decoder", lambda cfg, paths, enc, device="cpu": dec)
    cfg, paths = load_config(None, "smoke"), Paths.at(folder.parent)
    runs = []
    for batch in (1, 5, 12, 64):  # 5 leaves a last batch of 2
        ext = InceptionExtractor(inception_file, "cpu", batch_size=batch)
        for chunk in (5, 500):
            runs.append(reconstruction_metrics(folder, RES, ext,
                                               reconstructor(cfg, paths, batch), None,
                                               chunk=chunk, seam_period=2))
    assert runs[0]["rfid"] > 0
    for key in ("rfid", "recon_psnr"):
        assert _close([r[key] for r in runs]), (key, [r[key] for r in runs])


def test_the_running_statistics_do_not_lose_precision_to_the_chunking():
    """float64 Chan merges: features with a large common offset (where summed outer products
    in float32 cancel) give the same covariance in chunks of 1, 7 or all at once."""
    feats = np.random.default_rng(2).normal(size=(50, 16)) + 1e6
    whole = FeatureStats.from_features(feats)
    for chunk in (1, 7):
        acc = StatsAccumulator()
        for i in range(0, len(feats), chunk):
            acc.update(feats[i: i + chunk])
        s = acc.stats()
        assert np.allclose(s.sigma, whole.sigma, rtol=1e-9, atol=1e-9)
        assert np.allclose(s.mu, whole.mu, rtol=1e-15)
    assert np.allclose(whole.sigma, np.cov(feats - 1e6, rowvar=False), rtol=1e-8, atol=1e-9)


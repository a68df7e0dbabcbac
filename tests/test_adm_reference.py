"""ADM reference batches: their layout is checked in one line, FID uses the stored statistics
when the file has them and the images' otherwise, precision/recall only where images exist,
and the evaluate stage's metrics name the reference set."""

import logging

import numpy as np
import pytest
import torch

from rae_core.config import from_dict
from rae_core.errors import ConfigError, DataError
from rae_core.evaluation import Reference, sample_metrics
from rae_core.metrics import FeatureStats, frechet_distance
from rae_core.metrics.adm import layout, read_reference
from rae_core.metrics.features import as_float_images

RES = 8


class ProjectedExtractor:
    """uint8 images -> 2048-d features through a fixed random projection (pool_3's size)."""

    name = "inception-test"

    def __init__(self):
        self.proj = torch.randn(RES * RES * 3, 2048, generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = as_float_images(images).double().flatten(1)
        return (x @ self.proj).numpy()


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)


def _stored(seed=3):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(2048, 64))
    return rng.normal(size=2048), a @ a.T / 64


def test_a_bad_layout_is_named_in_one_line(tmp_path):
    with pytest.raises(DataError, match=r"evaluate.reference: .*batch.npz not found"):
        layout(tmp_path / "batch.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_1=np.zeros(3))
    with pytest.raises(DataError, match=r"bad.npz has neither 'arr_0' .*keys: arr_1$"):
        layout(bad)
    mu, _ = _stored()
    np.savez(bad, mu=mu)
    with pytest.raises(DataError, match=r"bad.npz has mu but no 'sigma'"):
        layout(bad)
    np.savez(bad, arr_0=np.zeros((2, RES, RES, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"arr_0 must be uint8 \(N, H, W, 3\)"):
        layout(bad)
    np.savez(bad, mu=mu[:10], sigma=np.eye(10))
    with pytest.raises(DataError, match=r"pool_3 statistics"):
        layout(bad)


def test_images_only_give_their_own_statistics_and_precision_recall_features(tmp_path):
    path, images, ext = tmp_path / "VIRTUAL_test.npz", _images(40, 1), ProjectedExtractor()
    np.savez(path, arr_0=images, arr_1=np.arange(40))
    assert layout(path) == (True, False)
    stats, feats, name = read_reference(path, ext, tmp_path / "cache")
    assert name == "adm:VIRTUAL_test.npz"
    assert np.allclose(feats, ext(images))
    want = FeatureStats.from_features(ext(images), ext.name)
    assert np.allclose(stats.mu, want.mu) and np.allclose(stats.sigma, want.sigma)
    calls = ext.calls
    again = read_reference(path, ext, tmp_path / "cache")  # the features are cached per file
    assert ext.calls == calls and np.array_equal(again[1], feats)


def test_stored_statistics_are_the_fid_reference_and_precision_recall_is_skipped(tmp_path,
                                                                                 caplog):
    path, ext, (mu, sigma) = tmp_path / "stats.npz", ProjectedExtractor(), _stored()
    np.savez(path, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    with caplog.at_level(logging.WARNING, "rae_core.metrics.adm"):
        stats, feats, name = read_reference(path, ext, tmp_path)
    assert feats is None and name == "adm:stats.npz:stored-stats"
    assert np.array_equal(stats.mu, mu) and np.array_equal(stats.sigma, sigma)
    assert [r.message for r in caplog.records] == [
        "stats.npz: precision/recall needs the batch's images (arr_0), which the file lacks: "
        "not computed"]
    samples = _images(30, 2)
    m = sample_metrics(samples, np.zeros(30, dtype=int), ext, Reference(stats, feats, name),
                       None, pr_k=3, logits=False)
    assert "precision" not in m and "recall" not in m and m["reference"] == name
    assert m["fid"] == pytest.approx(frechet_distance(
        stats, FeatureStats.from_features(ext(samples), ext.name)))


def test_with_both_fid_uses_the_stored_statistics_and_pr_the_images(tmp_path):
    path, images, ext, (mu, sigma) = tmp_path / "both.npz", _images(40, 1), \
        ProjectedExtractor(), _stored()
    np.savez(path, arr_0=images, mu=mu, sigma=sigma)
    stats, feats, name = read_reference(path, ext, tmp_path)
    assert np.array_equal(stats.mu, mu) and np.allclose(feats, ext(images))
    m = sample_metrics(_images(30, 2), np.zeros(30, dtype=int), ext,
                       Reference(stats, feats, name), None, pr_k=3, logits=False)
    assert 0.0 <= m["precision"] <= 1.0 and m["reference"] == "adm:both.npz:stored-stats"


def test_a_reference_batch_needs_the_inception_extractor():
    with pytest.raises(ConfigError, match="evaluate.reference: .*evaluate.extractor=inception"):
        from_dict({"evaluate": {"reference": "VIRTUAL_imagenet256_labeled.npz"}})
    cfg = from_dict({"evaluate": {"reference": "x.npz", "extractor": "inception"}})
    assert cfg.evaluate.reference == "x.npz"

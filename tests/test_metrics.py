"""Metrics against known answers: closed-form FID, constructed precision/recall sets, IS and PSNR
values, batch-size invariance, offline weight handling and the real-digits domain classifier."""

import logging
import time

import numpy as np
import pytest
import torch
from scipy import linalg

from rae_core.errors import DataError, WeightsMissingError
from rae_core.metrics import (
    DomainClassifier,
    DomainExtractor,
    FeatureStats,
    InceptionExtractor,
    StatsAccumulator,
    class_accuracy,
    classifier_id,
    compute_reference_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    l1,
    load_classifier,
    precision_recall,
    psnr,
    rfid,
    save_classifier,
    train_domain_classifier,
)
from rae_core.metrics import features as features_module


def gaussian(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


def closed_form_fid(mu1, s1, mu2, s2) -> float:
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# --- FID -------------------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(fid_from_features(feats, feats)) < 1e-8


def test_fid_grows_monotonically_with_the_shift():
    d = 8
    a = gaussian(2000, np.zeros(d), np.eye(d), seed=1)
    fids = [fid_from_features(a, gaussian(2000, np.full(d, s), np.eye(d), seed=2))
            for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(fids, fids[1:], strict=False)), fids
    assert fids[0] < 0.05


def test_frechet_distance_matches_scipy_sqrtm_on_exact_gaussians():
    rng = np.random.default_rng(3)
    d = 6
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)  # non-commuting
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ours = frechet_distance(FeatureStats(mu1, s1, 10, "x"), FeatureStats(mu2, s2, 10, "x"))
    assert ours == pytest.approx(closed_form_fid(mu1, s1, mu2, s2), rel=1e-9)


def test_sample_fid_matches_closed_form_at_large_n():
    d = 4
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    s1 = np.diag([1.0, 2.0, 0.5, 1.0])
    s2 = np.array([[1.0, 0.3, 0, 0], [0.3, 1.0, 0, 0], [0, 0, 2.0, 0.5], [0, 0, 0.5, 1.0]])
    expected = closed_form_fid(mu1, s1, mu2, s2)
    sample = fid_from_features(gaussian(40000, mu1, s1, 4), gaussian(40000, mu2, s2, 5))
    assert sample == pytest.approx(expected, rel=0.03)


def test_singular_covariances_give_a_finite_real_fid():
    rng = np.random.default_rng(6)
    low_rank = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 10))  # rank 3 in 10-d
    fid = fid_from_features(low_rank, low_rank + 1.0)
    assert np.isfinite(fid) and fid == pytest.approx(10.0, rel=1e-6)


def test_stats_of_different_extractors_are_refused():
    feats = np.random.default_rng(7).normal(size=(50, 4))
    a = FeatureStats.from_features(feats, "inception-2015-12-05:clean")
    b = FeatureStats.from_features(feats, "domain:abc123")
    with pytest.raises(DataError) as err:
        frechet_distance(a, b)
    msg = str(err.value)
    assert "inception-2015-12-05:clean" in msg and "domain:abc123" in msg and "\n" not in msg


def test_too_few_samples_for_the_dimension_warn(caplog):
    with caplog.at_level(logging.WARNING):
        FeatureStats.from_features(np.random.default_rng(8).normal(size=(10, 20)), "x")
    assert "rank-deficient" in caplog.text


def test_feature_stats_round_trip(tmp_path):
    stats = FeatureStats.from_features(np.random.default_rng(9).normal(size=(40, 5)), "domain:x")
    path = stats.save(tmp_path / "ref.npz")
    back = FeatureStats.load(path)
    assert back.extractor == "domain:x" and back.n == 40
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert not list(tmp_path.glob(".*tmp"))


def uneven_chunks(feats: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == len(feats)
    return [feats[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def test_streamed_stats_equal_the_direct_computation():
    rng = np.random.default_rng(10)
    # A large common offset: naive sums of outer products would cancel away the covariance.
    feats = 1e4 + rng.normal(size=(240, 7)) @ rng.normal(size=(7, 7))
    other = rng.normal(0.5, 2.0, size=(180, 7))
    acc = StatsAccumulator("x")
    for part in uneven_chunks(feats, [1, 0, 97, 2, 13, 127]):
        acc.update(part)
    streamed = acc.stats()
    assert streamed.n == 240 and streamed.extractor == "x"
    np.testing.assert_allclose(streamed.mu, feats.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(streamed.sigma, np.cov(feats, rowvar=False), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_array_equal(streamed.sigma, streamed.sigma.T)
    fid = frechet_distance(streamed, StatsAccumulator("x").update(other).stats())
    assert fid == pytest.approx(fid_from_features(feats, other), rel=1e-9)


def test_merged_accumulators_equal_one_over_everything():
    feats = np.random.default_rng(11).normal(3.0, 1.0, size=(300, 5))
    whole = StatsAccumulator("x").update(feats).stats()
    a, b = StatsAccumulator("x"), StatsAccumulator("x")
    for part in uneven_chunks(feats[:110], [60, 50]):
        a.update(part)
    b.update(feats[110:])
    merged = a.merge(b).merge(StatsAccumulator("x")).stats()  # merging an empty one: no-op
    assert merged.n == 300
    np.testing.assert_allclose(merged.mu, whole.mu, rtol=1e-13)
    np.testing.assert_allclose(merged.sigma, whole.sigma, rtol=1e-10, atol=1e-13)
    into_empty = StatsAccumulator("x").merge(b).stats()
    np.testing.assert_allclose(into_empty.sigma, np.cov(feats[110:], rowvar=False), rtol=1e-12)
    assert b.n == 190  # merging left the merged-in accumulator untouched
    with pytest.raises(DataError):
        a.merge(StatsAccumulator("y"))
    with pytest.raises(ValueError):
        StatsAccumulator("x").stats()
    with pytest.raises(ValueError):
        StatsAccumulator("x").update(feats).update(feats[:, :3])


def test_feature_stats_save_keeps_extra_arrays(tmp_path):
    stats = FeatureStats.from_features(np.random.default_rng(12).normal(size=(20, 3)), "x")
    extra = np.arange(6.0).reshape(2, 3)
    path = stats.save(tmp_path / "ref.npz", subset=extra)
    assert FeatureStats.load(path).n == 20
    with np.load(path) as z:
        np.testing.assert_array_equal(z["subset"], extra)


class CountingExtractor:
    def __init__(self, name: str):
        self.name, self.calls = name, 0

    def __call__(self, images):
        self.calls += 1
        return images.flatten(1).double().numpy()[:, :6]


def test_reference_stats_are_cached_per_extractor(tmp_path):
    images = torch.rand(30, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "ref.npz"
    first = CountingExtractor("a")
    s1 = compute_reference_stats(images, first, path)
    s2 = compute_reference_stats(images, first, path)
    assert first.calls == 1 and s2.extractor == "a"
    np.testing.assert_array_equal(s1.sigma, s2.sigma)
    other = CountingExtractor("b")
    s3 = compute_reference_stats(images, other, path)
    assert other.calls == 1 and s3.extractor == "b" and FeatureStats.load(path).extractor == "b"


# --- precision / recall ----------------------------------------------------------------------

def clusters(centres: np.ndarray, per: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c + 0.1 * rng.normal(size=(per, centres.shape[1])) for c in centres])


ANGLES = np.linspace(0, 2 * np.pi, 10, endpoint=False)
CENTRES = 20.0 * np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)  # 10 separated 2-d modes


def test_precision_recall_of_identical_sets_is_one():
    x = clusters(CENTRES, 50, seed=0)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_of_far_disjoint_sets_is_zero():
    real = clusters(CENTRES, 50, seed=0)
    fake = clusters(CENTRES + 100.0, 50, seed=1)
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_fake_set_covering_half_the_modes():
    real = clusters(CENTRES, 200, seed=0)
    fake = clusters(CENTRES[:5], 400, seed=1)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.93  # k-NN balls cover ~97% of a 2-d mode
    assert 0.45 <= recall <= 0.5


def test_precision_recall_is_independent_of_block_size():
    real = np.random.default_rng(2).normal(size=(300, 8))
    fake = np.random.default_rng(3).normal(0.3, 1.0, size=(250, 8))
    big = precision_recall(real, fake, k=3, batch=1000)
    assert 0 < big[0] < 1 and 0 < big[1] < 1
    for batch in (1, 7, 64):
        assert precision_recall(real, fake, k=3, batch=batch) == big


# --- Inception Score -------------------------------------------------------------------------

def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((100, 7)), splits=10)  # logits
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = inception_score(np.full((100, 7), 1 / 7), splits=10)  # probabilities
    assert mean == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    k = 8
    probs = np.eye(k)[np.arange(10 * k * 3) % k]
    mean, _ = inception_score(probs, splits=1)
    assert mean == pytest.approx(k)
    mean, _ = inception_score(probs, splits=10)  # chunks of a shuffle: nearly every class
    assert k - 1 < mean <= k + 1e-9
    mean_logits, _ = inception_score(50.0 * probs, splits=10)  # near one-hot after softmax
    assert mean_logits == pytest.approx(mean, rel=1e-6)


def test_inception_score_of_class_sorted_samples_equals_that_of_the_same_samples_shuffled():
    k, per_class = 100, 50
    rng = np.random.default_rng(0)
    logits = 8.0 * np.eye(k)[np.repeat(np.arange(k), per_class)] + rng.normal(
        size=(k * per_class, k))  # confident, class-ordered as the sample stage writes them
    sorted_is = inception_score(logits)[0]
    shuffled_is = inception_score(logits[rng.permutation(len(logits))])[0]
    assert sorted_is == pytest.approx(shuffled_is, rel=0.02)
    assert sorted_is > 0.5 * k  # consecutive chunks of sorted samples cap it at ~k / 10
    # one-hot over few classes: each chunk of the shuffle holds all of them, nearly evenly
    probs = np.eye(10)[np.repeat(np.arange(10), 500)]
    assert inception_score(probs)[0] == pytest.approx(10, rel=0.01)
    assert inception_score(probs, seed=1) != inception_score(probs, seed=0)


# --- reconstruction --------------------------------------------------------------------------

def test_psnr_and_l1_known_values():
    a = torch.full((3, 3, 8, 8), 0.5)
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    assert psnr(a, a + 0.01) == pytest.approx(40.0)
    assert l1(a, a + 0.1) == pytest.approx(0.1)
    # per image, then mean: 20 dB and 40 dB average to 30 dB (not the PSNR of the mean MSE)
    b = torch.cat([a[:1] + 0.1, a[1:2] + 0.01])
    assert psnr(a[:2], b) == pytest.approx(30.0)
    assert psnr(a, a) == 100.0
    u8 = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr(u8, u8 + 255) == pytest.approx(0.0)


def test_rfid_uses_the_extractor():
    real = torch.rand(200, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ext = CountingExtractor("c")
    assert abs(rfid(real, real, ext)) < 1e-8
    assert rfid(real, real * 0.5, ext) > 0.01


# --- extractors ------------------------------------------------------------------------------

def test_missing_inception_weights_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(features_module, "CLEANFID_CACHE", tmp_path / "inception-2015-12-05.pt")
    start = time.perf_counter()
    with pytest.raises(WeightsMissingError) as err:
        InceptionExtractor(tmp_path / "nowhere" / "inception-2015-12-05.pt")
    msg = str(err.value)
    assert "inception-2015-12-05.pt" in msg and "evaluate.inception_weights" in msg
    with pytest.raises(WeightsMissingError) as err:
        InceptionExtractor(None)
    assert "inception-2015-12-05.pt" in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - start < 5


class FakeInception(torch.nn.Module):
    """Same interface as clean-fid's TorchScript file: `.layers` -> (N, 2048, 1, 1), `.output`."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AvgPool2d(23), torch.nn.Conv2d(3, 2048, 1),
                                          torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.layers(x).flatten(1))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_inception_extractor_loads_a_local_torchscript_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(FakeInception()), str(path))
    ext = InceptionExtractor(path, device="cpu", batch_size=4)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    feats = ext(images)
    assert feats.shape == (6, 2048) and feats.dtype == np.float64
    ext.batch_size = 1
    np.testing.assert_allclose(ext(images), feats, rtol=1e-5, atol=1e-6)
    logits = ext.logits(images)
    weight = ext.model.output.weight.detach().double().numpy()
    np.testing.assert_allclose(logits, feats @ weight.T, rtol=1e-4, atol=1e-5)  # no bias
    # 8-bit quantisation first: changes below half a level do not move the features
    on_grid = (images * 255).round() / 255
    np.testing.assert_array_equal(ext(on_grid + 0.3 / 255), ext(on_grid - 0.3 / 255))


def test_domain_extractor_is_batch_invariant_and_named_by_weights():
    torch.manual_seed(0)
    clf = DomainClassifier()
    images = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = DomainExtractor(clf, batch_size=64)
    b = DomainExtractor(clf, batch_size=3)
    fa, fb = a(images), b(images)
    assert fa.shape == (20, 64) and fa.dtype == np.float64
    np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-6)
    assert a.name == b.name and a.name.startswith("domain:")
    torch.manual_seed(1)
    assert DomainExtractor(DomainClassifier()).name != a.name
    uint8 = (images.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    assert a(uint8).shape == (20, 64)


def test_domain_classifier_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    clf = DomainClassifier().eval()
    path = save_classifier(clf, tmp_path / "clf.pt", {"val_accuracy": 0.5, "dataset": "d"})
    back = load_classifier(path)
    assert back.metadata == {"val_accuracy": 0.5, "dataset": "d"}
    assert classifier_id(back) == classifier_id(clf)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), clf(x))
    with pytest.raises(WeightsMissingError):
        load_classifier(tmp_path / "missing.pt")


def test_domain_training_is_deterministic_under_seed():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    runs = [train_domain_classifier(x, y, x, y, epochs=1, batch_size=32, seed=3) for _ in range(2)]
    assert classifier_id(runs[0][0]) == classifier_id(runs[1][0])
    assert runs[0][1] == runs[1][1]


@pytest.mark.slow
def test_domain_classifier_reaches_97_percent_on_real_digits():
    from rae_core.data.digits import digit_images, stratified_split

    images, labels = digit_images()
    val = stratified_split(labels, 0.2, seed=0)
    model, acc = train_domain_classifier(images[~val], labels[~val], images[val], labels[val],
                                         seed=0)
    assert acc >= 0.97
    assert class_accuracy(model, images[val], labels[val]) == acc
    # the real split against itself in the classifier's feature space, and a corrupted copy
    ext = DomainExtractor(model)
    real = images[val]
    noisy = np.clip(real.astype(np.int16) + np.random.default_rng(0).integers(
        -60, 60, real.shape), 0, 255).astype(np.uint8)
    assert abs(rfid(real, real, ext)) < 1e-6
    assert rfid(real, noisy, ext) > 1.0

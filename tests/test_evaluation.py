"""The evaluate stage streams splits in chunks: its numbers must not depend on the chunk size and
must equal those computed from whole splits in memory."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rae_core import evaluation
from rae_core.data.folder import iter_split, load_split
from rae_core.device import torch_threads
from rae_core.evaluation import (
    Reference,
    pr_stride,
    reconstruction_metrics,
    reference,
    reference_from_split,
    sample_metrics,
    seam_energies,
    seam_ratio,
)
from rae_core.generate import load_samples, save_samples
from rae_core.metrics import (
    DomainClassifier,
    FeatureStats,
    class_accuracy,
    classifier_id,
    fid_from_features,
    inception_score,
    precision_recall,
    psnr,
    rfid,
)
from rae_core.paths import Paths
from rae_core.presets import load_config

RES = 8
SIZES = {"train": (9, 8, 6), "val": (4, 3, 5)}  # images per class: chunks straddle classes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small image folder (3 classes, 23 train and 12 val images of 8 px)."""
    root = tmp_path_factory.mktemp("evaluation") / "dataset"
    rng = np.random.default_rng(0)
    for split, sizes in SIZES.items():
        for c, count in enumerate(sizes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i:02d}.png")
    return root


class FlatExtractor:
    """6 pixel values per image as features; `logits` makes it usable for the IS path too."""

    name = "flat"

    def __init__(self):
        self.calls = 0

    def __call__(self, images) -> np.ndarray:
        self.calls += 1
        return torch.as_tensor(images).flatten(1)[:, :6].double().numpy()

    def logits(self, images) -> np.ndarray:
        return 4.0 * self(images)


def test_chunked_reader_yields_every_image_once_in_file_order(folder):
    images, labels = load_split(folder, "val", RES)
    chunks = list(iter_split(folder, "val", RES, 5))
    assert [len(x) for x, _ in chunks] == [5, 5, 2]
    assert all(len(x) == len(y) for x, y in chunks)
    torch.testing.assert_close(torch.cat([x for x, _ in chunks]), images, rtol=0, atol=0)
    assert torch.equal(torch.cat([y for _, y in chunks]), labels)
    assert labels.tolist() == [0] * 4 + [1] * 3 + [2] * 5
    with pytest.raises(ValueError):
        next(iter_split(folder, "val", RES, 0))


@pytest.mark.parametrize("n,cap", [(1, 5), (5, 5), (6, 5), (23, 5), (1_281_167, 50_000)])
def test_pr_subset_is_bounded_and_the_densest_that_fits(n, cap):
    stride = pr_stride(n, cap)
    assert len(range(0, n, stride)) <= cap
    assert stride == 1 or len(range(0, n, stride - 1)) > cap


def test_reference_does_not_depend_on_the_chunk_size(folder):
    images, _ = load_split(folder, "train", RES)
    direct = FlatExtractor()(images)
    refs = [reference_from_split(folder, RES, FlatExtractor(), chunk=c, max_pr=5)
            for c in (1, 7, 1000)]
    stride = pr_stride(len(direct), 5)
    assert stride == 5
    for ref in refs:
        assert ref.stats.n == 23 and ref.stats.extractor == "flat"
        np.testing.assert_allclose(ref.stats.mu, direct.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(ref.stats.sigma, np.cov(direct, rowvar=False), rtol=1e-10,
                                   atol=1e-14)
        # every 5th image in file order, wherever the chunk boundaries fall
        np.testing.assert_array_equal(ref.pr_features, direct[::5])
    everything = reference_from_split(folder, RES, FlatExtractor(), chunk=7, max_pr=50)
    np.testing.assert_array_equal(everything.pr_features, direct)


def test_reference_is_cached_per_dataset_and_extractor(folder, tmp_path):
    cfg = load_config(None, "smoke", [f"data.root={folder}", f"data.resolution={RES}"])
    paths = Paths.at(tmp_path)
    ext = FlatExtractor()
    first = reference(cfg, paths, ext)
    again = reference(cfg, paths, ext)
    assert ext.calls == 1  # 23 images: one chunk, extracted once
    np.testing.assert_array_equal(again.stats.sigma, first.stats.sigma)
    np.testing.assert_array_equal(again.pr_features, first.pr_features)
    assert again.stats.n == 23 and again.stats.extractor == "flat"
    files = [p.name for p in paths.reference_dir.iterdir()]  # no temporary file left behind
    assert len(files) == 1 and files[0].startswith("train-reference-") and "flat" in files[0]


def test_sample_metrics_do_not_depend_on_the_chunk_size(folder):
    train, _ = load_split(folder, "train", RES)
    ext = FlatExtractor()
    ref = Reference(FeatureStats.from_features(ext(train), "flat"), ext(train))
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, (40, RES, RES, 3), dtype=np.uint8)
    labels = np.arange(40) % 3
    torch.manual_seed(0)
    clf = DomainClassifier(num_classes=3).eval()
    runs = [sample_metrics(samples, labels, ext, ref, clf, pr_k=3, logits=True, chunk=c)
            for c in (7, 1000)]
    floats = torch.from_numpy(samples).permute(0, 3, 1, 2).float().div(255)
    fake = ext(floats)
    assert runs[0]["fid"] == pytest.approx(fid_from_features(ext(train), fake), rel=1e-9)
    assert (runs[0]["precision"], runs[0]["recall"]) == precision_recall(ext(train), fake, k=3)
    assert runs[0]["class_accuracy"] == class_accuracy(clf, floats, labels)
    mean, std = inception_score(ext.logits(floats))
    assert runs[0]["inception_score"] == pytest.approx(mean, rel=1e-12)
    assert runs[0]["inception_score_std"] == pytest.approx(std, rel=1e-9)
    assert runs[0]["num_samples"] == 40 and runs[0]["extractor"] == "flat"
    assert runs[0].keys() == runs[1].keys()
    for key, value in runs[0].items():
        assert runs[1][key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float)
                                else value), key


def test_reconstruction_metrics_do_not_depend_on_the_chunk_size(folder):
    val, labels = load_split(folder, "val", RES)

    def reconstruct(images: torch.Tensor) -> torch.Tensor:  # a lossy, per-image "decoder"
        return (images * 0.8 + 0.1).round(decimals=1)

    torch.manual_seed(0)
    clf = DomainClassifier(num_classes=3).eval()
    runs = [reconstruction_metrics(folder, RES, FlatExtractor(), reconstruct, clf, chunk=c,
                                   seam_period=2) for c in (1, 5, 1000)]
    expected = {"rfid": rfid(val, reconstruct(val), FlatExtractor()),
                "recon_psnr": psnr(reconstruct(val), val),
                "classifier_val_accuracy": class_accuracy(clf, val, labels),
                "recon_seam_ratio": seam_ratio(seam_energies(reconstruct(val), 2)),
                "real_seam_ratio": seam_ratio(seam_energies(val, 2))}
    assert expected["rfid"] > 0.01
    for m in runs:
        assert m == pytest.approx(expected, rel=1e-9)


def test_run_matches_the_whole_split_computation(folder, tmp_path, monkeypatch):
    """The stage end to end (extractor and decoder stubbed) against the in-memory formulas."""
    cfg = load_config(None, "smoke", [f"data.root={folder}", f"data.resolution={RES}",
                                      "evaluate.curve_per_class=0"])
    paths = Paths.at(tmp_path)
    torch.manual_seed(0)
    clf = DomainClassifier(num_classes=3).eval()
    ext = FlatExtractor()
    monkeypatch.setattr(evaluation, "build_extractor", lambda cfg, paths, device: (ext, clf))
    monkeypatch.setattr(evaluation, "reconstructor",
                        lambda cfg, paths, batch: lambda x: (x * 0.9).round(decimals=2))
    samples = np.random.default_rng(2).integers(0, 256, (30, RES, RES, 3), dtype=np.uint8)
    labels = np.arange(30) % 3
    paths.samples_dir.mkdir(parents=True)
    save_samples(paths.samples_dir / "samples.npz", samples, labels)
    m = evaluation.run(cfg, paths)

    train, _ = load_split(folder, "train", RES)
    val, val_labels = load_split(folder, "val", RES)
    fake = torch.from_numpy(samples).permute(0, 3, 1, 2).float().div(255)
    recs = (val * 0.9).round(decimals=2)
    prec, rec = precision_recall(ext(train), ext(fake), k=cfg.evaluate.pr_k)
    assert m.pop("extractor") == "flat" and m.pop("reference") == "train split"
    assert m.pop("eval_images_per_s") > 0
    assert m == pytest.approx({
        "fid": fid_from_features(ext(train), ext(fake)), "precision": prec, "recall": rec,
        "num_samples": 30,
        "class_accuracy": class_accuracy(clf, fake, labels),
        "classifier_val_accuracy": class_accuracy(clf, val, val_labels),
        "rfid": rfid(val, recs, ext), "recon_psnr": psnr(recs, val),
        "recon_seam_ratio": seam_ratio(seam_energies(recs, cfg.decoder.patch_size)),
        # an 8 px image holds no boundary of the 8 px patch grid: both ratios are NaN
        "real_seam_ratio": seam_ratio(seam_energies(val, cfg.decoder.patch_size))}, rel=1e-9,
        nan_ok=True)
    assert (paths.evaluate_dir / "metrics.json").is_file()
    # the curve is off, yet its file is there for dvc.yaml, and no plot of an earlier curve
    assert json.loads((paths.evaluate_dir / "fid_curve.json").read_text()) == []
    assert not (paths.evaluate_dir / "fid_vs_step.png").exists()


def test_samples_npz_has_the_layout_adms_evaluator_reads(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2])
    save_samples(tmp_path / "samples.npz", images, labels)
    with np.load(tmp_path / "samples.npz") as data:  # as evaluator.py opens a sample batch
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (6, 8, 8, 3)
        np.testing.assert_array_equal(data["arr_0"], images)
    back, back_labels = load_samples(tmp_path / "samples.npz")
    np.testing.assert_array_equal(back_labels, labels)
    assert list(tmp_path.iterdir()) == [tmp_path / "samples.npz"]


def test_the_domain_classifier_does_not_depend_on_the_thread_count(digits_root, tmp_path):
    """Its weights are the FID's feature space: trained on 1 or 2 threads they differed (and
    so did the FID), whichever process evaluates."""
    cfg = load_config(None, "smoke", [f"data.root={digits_root}", "evaluate.classifier_epochs=1"])
    names = []
    for n in (1, 2):
        with torch_threads(n):
            clf = evaluation.domain_classifier(cfg, Paths.at(tmp_path / f"t{n}"))
            names.append(classifier_id(clf))
            assert torch.get_num_threads() == n  # the caller's count is given back
    assert names[0] == names[1]

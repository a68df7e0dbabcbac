"""The embedded photo crops: shipped files only, deterministic, honest splits, real colour."""

import json
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rae_core.data.folder import load_split, validate_folder
from rae_core.data.photos import PER_CLASS, PHOTOS, PHOTOS_SIZE, materialise_photos, photo_crops
from rae_core.errors import ConfigError
from rae_core.evaluation import seam_energies, seam_ratio
from rae_core.metrics import train_domain_classifier
from rae_core.paths import Paths
from rae_core.presets import load_config
from rae_core.stages import prepare

VAL_FRACTION = 0.2
N_VAL = round(PER_CLASS * VAL_FRACTION)


@pytest.fixture(scope="module")
def photos_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "dataset"
    materialise_photos(root, VAL_FRACTION, seed=0)
    return root


@pytest.fixture(scope="module")
def crops():
    return photo_crops(VAL_FRACTION, seed=0)


def test_every_photo_loads_without_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    for name, load in PHOTOS.items():
        photo = load()
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3, name
        assert min(photo.shape[:2]) >= 128, name


def test_the_folder_has_ten_classes_of_32px_crops(photos_root):
    summary = validate_folder(photos_root, num_classes=10, resolution=PHOTOS_SIZE)
    assert summary["classes"] == sorted(PHOTOS)
    assert (summary["train"], summary["val"]) == (10 * (PER_CLASS - N_VAL), 10 * N_VAL)
    counts = json.loads((photos_root / "dataset.json").read_text())["counts"]
    assert set(counts["train"].values()) == {PER_CLASS - N_VAL}
    assert set(counts["val"].values()) == {N_VAL}
    with Image.open(next((photos_root / "val" / "chelsea").iterdir())) as im:
        assert (im.mode, im.size) == ("RGB", (PHOTOS_SIZE, PHOTOS_SIZE))


def test_materialising_is_deterministic_under_the_seed(photos_root, crops):
    written, labels = load_split(photos_root, "val", PHOTOS_SIZE)
    images, _, _ = crops["val"]
    # the folder lists classes sorted by name; the crops come in PHOTOS' order
    order = np.argsort(list(PHOTOS), kind="stable")
    again = np.concatenate([images[c * N_VAL:(c + 1) * N_VAL] for c in order])
    assert np.array_equal((written.permute(0, 2, 3, 1) * 255).round().byte().numpy(), again)
    assert labels.tolist() == np.repeat(np.arange(10), N_VAL).tolist()
    other = photo_crops(VAL_FRACTION, seed=1)["val"][0]
    assert not np.array_equal(other, images)


def test_train_and_val_crops_never_overlap(crops):
    def boxes(split: str, label: int) -> np.ndarray:
        _, labels, b = crops[split]
        return np.array(b)[labels == label]  # (n, 3): top, left, side

    for label in range(len(PHOTOS)):
        t, v = boxes("train", label), boxes("val", label)
        assert (t[:, 2] >= 48).all() and (t[:, 2] <= 128).all()
        # two squares overlap when they overlap both along the rows and along the columns
        rows = (t[:, None, 0] < v[None, :, 0] + v[None, :, 2]) & \
               (v[None, :, 0] < t[:, None, 0] + t[:, None, 2])
        cols = (t[:, None, 1] < v[None, :, 1] + v[None, :, 2]) & \
               (v[None, :, 1] < t[:, None, 1] + t[:, None, 2])
        assert not (rows & cols).any(), list(PHOTOS)[label]


def test_the_crops_are_real_colour(crops):
    images, labels, _ = crops["train"]
    x = images.astype(np.float64)
    for label, name in enumerate(PHOTOS):
        per_class = x[labels == label]
        spread = np.abs(per_class - per_class.mean(-1, keepdims=True)).mean()  # channels differ
        assert spread > 2.0, name
    assert np.abs(x[..., 0] - x[..., 2]).mean() > 10  # not grey overall


def test_prepare_switches_between_digits_and_photos(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray: no dataset check on workers
    paths = Paths.at(tmp_path)
    summary = tmp_path / "data" / "dataset.json"
    for dataset, classes, images in (("photos", sorted(PHOTOS), 10 * PER_CLASS),
                                     ("digits", [str(c) for c in range(10)], 1797),
                                     ("photos", sorted(PHOTOS), 10 * PER_CLASS)):
        out = prepare(load_config(None, "smoke", [f"data.dataset={dataset}"]), paths)
        s = json.loads(summary.read_text())
        assert s["source"] == dataset and s["classes"] == classes
        assert out["train_images"] + out["val_images"] == images
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dataset",
                                                                         "dataset.json"]


@pytest.mark.slow
def test_the_domain_classifier_tells_the_photos_apart(photos_root):
    train = load_split(photos_root, "train", PHOTOS_SIZE)
    val = load_split(photos_root, "val", PHOTOS_SIZE)
    _, acc = train_domain_classifier(*train, *val, epochs=3, batch_size=128, seed=0)
    assert acc > 0.5  # chance is 0.1


def test_the_seam_ratio_is_one_for_photos_and_large_for_flat_patches(crops):
    photos = torch.from_numpy(crops["val"][0]).permute(0, 3, 1, 2).float() / 255
    ramp = torch.linspace(0, 1, 32).expand(2, 3, 32, 32)  # smooth: equal steps everywhere
    blocky = F.interpolate(F.avg_pool2d(photos, 8), scale_factor=8, mode="nearest")
    blocky = blocky + 0.01 * torch.randn(blocky.shape, generator=torch.Generator().manual_seed(0))
    assert seam_ratio(seam_energies(photos, 8)) == pytest.approx(1.0, abs=0.1)
    assert seam_ratio(seam_energies(ramp, 8)) == pytest.approx(1.0)
    assert seam_ratio(seam_energies(blocky, 8)) > 20
    # energies add up over chunks: the ratio of a split does not depend on how it is streamed
    parts = seam_energies(blocky[:100], 8) + seam_energies(blocky[100:], 8)
    assert seam_ratio(parts) == pytest.approx(seam_ratio(seam_energies(blocky, 8)), rel=1e-12)
    assert seam_ratio(seam_energies(torch.full((1, 3, 16, 16), 0.5), 8)) == 1.0


def test_only_the_photo_preset_refines_its_decoder():
    from rae_core.presets import PRESETS

    for name in PRESETS:  # the digits, the paper's presets and the other families: no refine
        refine = load_config(None, name).decoder.refine
        assert refine.channels == (32 if name == "tiny-photos" else 0), name
    with pytest.raises(ConfigError, match="decoder.refine.kernel"):
        load_config(None, "tiny-photos", ["decoder.refine.kernel=4"])
    with pytest.raises(ConfigError, match="decoder.refine.channels"):
        load_config(None, "tiny-photos", ["decoder.refine.channels=-1"])

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rae_core.data.digits import digit_images, materialise_digits, stratified_split
from rae_core.data.folder import (
    ImageFolderDataset,
    ImageSource,
    center_crop_adm,
    load_image,
    scan_split,
    to_unit,
    validate_folder,
)
from rae_core.errors import DataError
from rae_core.train.sampler import batch_indices, rank_slice


def test_digits_materialise_as_a_stratified_deterministic_image_folder(digits_root, tmp_path):
    summary = json.loads((digits_root / "dataset.json").read_text())
    train, val = summary["counts"]["train"], summary["counts"]["val"]
    assert sum(train.values()) + sum(val.values()) == 1797
    assert sorted(train) == [str(c) for c in range(10)]
    for c in train:  # every class split 80/20 within one image
        total = train[c] + val[c]
        assert abs(val[c] - 0.2 * total) <= 1
    again = tmp_path / "again"
    materialise_digits(again, 0.2, 0)
    a = sorted(p.relative_to(digits_root) for p in digits_root.rglob("*.png"))
    b = sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert a == b
    first = a[0]
    assert np.array_equal(np.asarray(Image.open(digits_root / first)),
                          np.asarray(Image.open(again / first)))


def test_digit_images_are_rgb_32px_with_bright_ink():
    images, labels = digit_images()
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 2])
    assert images[:, 0, 0].mean() < 10 and images[:, 12:20, 12:20].mean() > 40
    assert set(labels.tolist()) == set(range(10))
    mask = stratified_split(labels, 0.2, 0)
    assert np.array_equal(mask, stratified_split(labels, 0.2, 0))


def test_dataset_reads_tensors_in_unit_range(digits_root):
    ds = ImageFolderDataset(digits_root, "val", 32)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0
    assert isinstance(y, int)
    info = validate_folder(digits_root, num_classes=10)
    assert info["train"] + info["val"] == 1797


def test_adm_center_crop_sizes():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 900, 3), np.uint8))
    assert center_crop_adm(im, 256).shape == (256, 256, 3)
    small = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    assert center_crop_adm(small, 32).shape == (32, 32, 3)


def _folder(tmp_path, classes=("a", "b")):
    for split in ("train", "val"):
        for c in classes:
            d = tmp_path / split / c
            d.mkdir(parents=True)
            Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(d / "0.png")
    return tmp_path


def test_corrupt_file_is_reported_by_name(tmp_path):
    root = _folder(tmp_path)
    bad = root / "train" / "a" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        validate_folder(root)


def test_empty_class_is_reported_by_name(tmp_path):
    root = _folder(tmp_path)
    (root / "train" / "c").mkdir()
    with pytest.raises(DataError, match="empty class") as err:
        scan_split(root, "train")
    assert "train/c" in str(err.value)


def test_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="rae stage prepare"):
        scan_split(tmp_path / "nowhere", "train")


def test_greyscale_and_rgba_are_converted(tmp_path):
    g = tmp_path / "g.png"
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(g)
    rgba = tmp_path / "r.png"
    Image.fromarray(np.full((32, 32, 4), 255, np.uint8)).save(rgba)
    assert load_image(g, 32).shape == (32, 32, 3)
    assert load_image(rgba, 16).shape == (16, 16, 3)


def test_step_batches_are_epoch_permutations_and_split_across_ranks():
    n, b = 10, 4
    seen = torch.cat([batch_indices(n, b, 0, s) for s in range(5)])  # two epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert torch.equal(batch_indices(n, b, 0, 3), batch_indices(n, b, 0, 3))
    full = batch_indices(n, b, 0, 1)
    assert torch.equal(torch.cat([rank_slice(full, r, 2) for r in range(2)]), full)


def test_image_source_flips_half_the_batch(digits_root):
    src = ImageSource(digits_root, "train", 32)
    idx = torch.arange(64)
    x, _ = src.get(idx, torch.Generator().manual_seed(0))
    plain = to_unit(src.images[idx])
    flipped = (x == plain.flip(-1)).flatten(1).all(1) & ~(x == plain).flatten(1).all(1)
    assert 10 < int(flipped.sum()) < 54


def test_images_smaller_than_the_crop_are_upsampled_and_counted(tmp_path, caplog):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / split / cls / "big.png")
    small = tmp_path / "train" / "a" / "small.png"
    Image.new("L", (12, 20), 128).save(small)
    with caplog.at_level("WARNING"):
        info = validate_folder(tmp_path, num_classes=2, resolution=32)
    assert info["upsampled"] == 1
    assert "small.png (12x20)" in caplog.text and "32 px crop" in caplog.text
    ds = ImageFolderDataset(tmp_path, "train", 32)
    image, label = ds[ds.index.files.index(small)]
    assert image.shape == (3, 32, 32) and label == 0
    assert torch.allclose(image, torch.full_like(image, 128 / 255), atol=1 / 255)

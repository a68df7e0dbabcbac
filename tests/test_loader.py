"""Data loading: DataLoader workers keep the step order, splits above data.max_in_memory are
read lazily, latent shards are read through their memory map, JPEGs can be decoded apart from
their crop (extract.gpu_decode) with the CPU path's result."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rae_core.config import from_dict
from rae_core.data.folder import ImageFolderDataset, ImageSource, center_crop_adm, load_image
from rae_core.data.jpeg import center_crop_adm_tensor, decode_batch, read_encoded
from rae_core.data.latents import MANIFEST, ShardSource, shard_name
from rae_core.data.loader import StepLoader, range_batches
from rae_core.errors import ConfigError
from rae_core.train.sampler import batch_indices, rank_slice, step_seed


def _batches(loader, steps, seed=0):
    out = []
    for step in steps:
        x, y = loader.get(step, torch.Generator().manual_seed(step_seed(seed, step)))
        out.append((x.clone(), y.clone()))
    return out


@pytest.mark.parametrize("lazy", [False, True])
def test_step_batches_are_the_same_whatever_the_worker_count(digits_root, lazy):
    src = ImageSource(digits_root, "train", 32, max_in_memory=0 if lazy else 10_000)
    assert (src.images is None) == lazy
    steps = [0, 1, 2, 3, 4, 2, 3, 7]  # a restore to step 2, then a jump (a resume) to 7
    ref = _batches(StepLoader(src, 16, 0, 8, rank=1, world=2), steps)
    for k, step in enumerate(steps):  # this rank's half of the global batch, flipped as before
        idx = rank_slice(batch_indices(len(src), 16, 0, step), 1, 2)
        x, y = src.get(idx, torch.Generator().manual_seed(step_seed(0, step)))
        assert torch.equal(ref[k][0], x) and torch.equal(ref[k][1], y)
    for workers in (1, 2):
        got = _batches(StepLoader(src, 16, 0, 8, rank=1, world=2, workers=workers,
                                  prefetch=3), steps)
        for (xa, ya), (xb, yb) in zip(ref, got, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_split_in_memory_up_to_the_limit_and_read_lazily_above(digits_root):
    n = len(ImageFolderDataset(digits_root, "val", 32))
    at, above = ImageSource(digits_root, "val", 32, n), ImageSource(digits_root, "val", 32, n - 1)
    assert at.images is not None and at.images.shape == (n, 3, 32, 32)
    assert above.images is None
    idx = torch.tensor([0, n - 1, 5, 5])
    for a, b in zip(at.read(idx), above.read(idx), strict=True):
        assert torch.equal(a, b)


def test_execution_keys_leave_the_fingerprint_alone():
    base = from_dict({})
    other = from_dict({"data": {"max_in_memory": 3, "loader": {"workers": 4, "prefetch": 8,
                                                               "pin_memory": False}},
                       "extract": {"gpu_decode": True}})
    assert other.fingerprint() == base.fingerprint()
    assert from_dict({"data": {"resolution": 64}}).fingerprint() != base.fingerprint()


@pytest.mark.parametrize("workers", [0, 2])
def test_extract_batches_are_the_split_in_file_order(digits_root, workers):
    ds = ImageFolderDataset(digits_root, "train", 32)
    cfg = from_dict({"data": {"loader": {"workers": workers}}})
    got = list(range_batches(ds, 10, 47, 16, cfg))
    assert [len(x) for x, _ in got] == [16, 16, 5]
    x, y = torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
    assert torch.equal(x, torch.stack([ds[j][0] for j in range(10, 47)]))
    assert y.tolist() == list(ds.index.labels[10:47])


def test_gpu_decode_without_a_gpu_is_one_line_naming_the_key(digits_root):
    ds = ImageFolderDataset(digits_root, "train", 32)
    with pytest.raises(ConfigError) as err:
        next(range_batches(ds, 0, 4, 4, from_dict({"extract": {"gpu_decode": True}})))
    msg = str(err.value)
    assert msg.startswith("extract.gpu_decode: true needs a CUDA device") and "\n" not in msg


def _photo(h, w, seed):
    """A smooth synthetic photo (uint8 (h, w, 3)): JPEG's home ground, unlike noise."""
    g = np.random.default_rng(seed).integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(g).resize((w, h), Image.BICUBIC))


def test_worker_reads_jpeg_bytes_and_decodes_the_rest_itself(tmp_path):
    rgb, grey, cmyk, png = (tmp_path / n for n in ("a.jpg", "b.jpg", "c.jpg", "d.png"))
    Image.fromarray(_photo(60, 80, 0)).save(rgb, quality=90)
    Image.fromarray(_photo(60, 80, 1)[..., 0]).save(grey, quality=90)
    Image.fromarray(_photo(60, 80, 2)).convert("CMYK").save(cmyk, quality=90)
    Image.fromarray(_photo(60, 80, 3)).save(png)
    for path in (rgb, grey):
        data, encoded = read_encoded(path, 32)
        assert encoded and data.dtype == torch.uint8 and bytes(data.numpy()) == path.read_bytes()
    for path in (cmyk, png):
        image, encoded = read_encoded(path, 32)
        assert not encoded
        assert torch.equal(image, torch.from_numpy(load_image(path, 32)).permute(2, 0, 1))


# decode_jpeg and PIL both decode with libjpeg-turbo on the CPU; the crop's float maths round
# like PIL's fixed-point resampler but not always alike: measured at most 1 grey level apart,
# on at most 0.016% of pixels (6 seeds at each of 7 sizes; 0.005% on the ten shipped photos
# at 256 px), so the bound is 1 level on 0.1% of pixels
@pytest.mark.parametrize("h, w, size", [(375, 500, 256), (333, 517, 128), (64, 90, 256),
                                        (601, 799, 64), (256, 256, 256)])
def test_decoded_jpeg_crops_like_the_cpu_path(tmp_path, h, w, size):
    path = tmp_path / "p.jpg"
    Image.fromarray(_photo(h, w, h + w)).save(path, quality=90)
    data, encoded = read_encoded(path, size)
    got = decode_batch([data, data], [encoded, encoded], [path, path], size, torch.device("cpu"))
    want = torch.from_numpy(load_image(path, size)).permute(2, 0, 1).float() / 255
    assert got.shape == (2, 3, size, size)
    diff = (got[0] - want).abs() * 255
    assert float(diff.max()) <= 1.0 + 1e-3 and float((diff > 0.5).float().mean()) < 0.001
    assert torch.equal(got[0], got[1])


def test_crop_maths_match_pil_exactly_on_exact_halvings():
    image = _photo(512, 768, 7)  # box-halved twice to 128 x 192: no bicubic pass is needed
    want = torch.from_numpy(center_crop_adm(Image.fromarray(image), 128)).permute(2, 0, 1)
    assert torch.equal(center_crop_adm_tensor(torch.from_numpy(image).permute(2, 0, 1), 128),
                       want)


class _Identity:
    def normalize(self, z):
        return z


def _mapped(path: Path) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of this process's mappings of `path` (/proc/self/smaps)."""
    spans, current = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
            current = None
            if len(parts) >= 6 and parts[5] == str(path):
                lo, hi = (int(a, 16) for a in parts[0].split("-"))
                current = [lo, hi, 0]
                spans.append(current)
        elif current is not None and parts[0] == "Rss:":
            current[2] = int(parts[1]) * 1024
    return [tuple(s) for s in spans]


def test_shard_source_reads_through_the_memory_map(tmp_path):
    shape, per, count = (64, 16, 16), 256, 4  # 32 MiB of float32 latents a shard
    identity = {"encoder": "test"}
    names = []
    for s in range(count):
        z = torch.arange(per * 2 * 64 * 256, dtype=torch.float32).reshape(per, 2, *shape) + s
        torch.save({"latents": z, "labels": torch.full((per,), s)}, tmp_path / shard_name(s))
        names.append(shard_name(s))
    (tmp_path / MANIFEST).write_text(json.dumps({"identity": identity, "shards": names}))
    total = count * per * 2 * 64 * 256 * 4
    src = ShardSource(tmp_path, _Identity(), identity, hflip=True)
    idx = torch.tensor([3, per + 1, 3 * per + 7, 2 * per, per - 1])
    x, y = src.get(idx, torch.Generator().manual_seed(0))
    resident = 0
    for s, z in enumerate(src.shards):  # each shard's latents are the file's own pages
        spans = _mapped(tmp_path / shard_name(s))
        ptr = z.untyped_storage().data_ptr()
        assert any(lo <= ptr < hi for lo, hi, _ in spans)
        resident += sum(r for _, _, r in spans)
    # what the five latents touched: the kernel maps file pages around each fault in folios of
    # up to 2 MiB (measured: 10 MiB here), against 128 MiB for the shards whole
    assert resident <= len(idx) * 4 * 2 ** 20 < total / 6, f"{resident} of {total} bytes read"
    flip = torch.randint(0, 2, (len(idx),), generator=torch.Generator().manual_seed(0))
    full = torch.cat([torch.load(tmp_path / n, weights_only=True)["latents"] for n in names])
    assert torch.equal(x, full[idx, flip]) and y.tolist() == (idx // per).tolist()


def test_a_training_loop_learns_the_same_weights_with_workers(tmp_path, digits_root, one_thread):
    from rae_core.paths import Paths
    from rae_core.presets import load_config
    from rae_core.train import pretrain_encoder

    weights = []
    for name, extra in (("inline", []), ("workers", ["data.loader.workers=2",
                                                     "data.max_in_memory=0"])):
        root = tmp_path / name
        root.mkdir()
        (root / "dataset").symlink_to(digits_root, target_is_directory=True)
        cfg = load_config(None, "smoke", ["data.root=dataset", "encoder.pretrain.steps=6",
                                          *extra])
        pretrain_encoder.train_loop({"cfg": cfg.to_dict(), "root": str(root),
                                     "run_dir": str(root / "ckpt"), "fingerprint": "test"})
        weights.append(torch.load(Paths.at(root).encoder_dir / "encoder.pt", weights_only=True))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

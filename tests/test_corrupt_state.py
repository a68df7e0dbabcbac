"""Files a crash of the file system left truncated, empty or zeroed: checkpoints fall back to the
one before, latent shards are re-made by extract, damaged statistics fail in one line naming the
command that re-makes them; checksums leave the stage signatures stable."""

import hashlib
import logging
from pathlib import Path

import pytest
import torch

from rae_core import stages
from rae_core.errors import DataError
from rae_core.paths import Paths
from rae_core.presets import load_config
from rae_core.store import atomic_save, checksum_path, safe_load, signature, verify
from rae_core.train.common import Checkpointer


def damage(path: Path, how: str) -> None:
    """As a crash may leave a file: cut in half, empty, or the right size with zeros inside
    (which still loads)."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(64) + data[middle + 64:])


DAMAGE = ["truncated", "empty", "zeroed"]


def test_a_checksummed_save_writes_a_sha256sum_line_beside_the_file(tmp_path):
    atomic_save({"x": torch.arange(3)}, tmp_path / "a.pt", checksum=True)
    digest = hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    assert checksum_path(tmp_path / "a.pt").read_text() == f"{digest}  a.pt\n"
    verify(tmp_path / "a.pt")
    damage(tmp_path / "a.pt", "zeroed")
    with pytest.raises(DataError, match=r"a.pt: damaged, its sha256 differs from a.pt.sha256; "
                                        "re-run the stage that writes it$"):
        verify(tmp_path / "a.pt")


def _two_checkpoints(run_dir: Path) -> tuple[Checkpointer, torch.nn.Linear]:
    model = torch.nn.Linear(2, 2)
    ckpt = Checkpointer(run_dir, "fp", "train-generator")
    for step in (10, 20):
        model.weight.data.fill_(step)
        ckpt.save(step, model=model)
    return ckpt, model


def test_each_save_keeps_the_checkpoint_before_it(tmp_path):
    ckpt, _ = _two_checkpoints(tmp_path)
    assert safe_load(tmp_path / "last.pt")["step"] == 20
    assert safe_load(tmp_path / "prev.pt")["step"] == 10
    for name in ("last.pt", "prev.pt"):
        verify(tmp_path / name)
        assert checksum_path(tmp_path / name).exists()
    assert ckpt.last_good == tmp_path / "last.pt"


@pytest.mark.parametrize("how, checksum", [(h, True) for h in DAMAGE] +
                         [("truncated", False), ("empty", False)])
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, how,
                                                                checksum):
    ckpt, model = _two_checkpoints(tmp_path)
    damage(tmp_path / "last.pt", how)
    if not checksum:  # as a crash between a save's renames leaves it: then loading checks it
        checksum_path(tmp_path / "last.pt").unlink()
    assert ckpt.last_good == (tmp_path / "prev.pt" if checksum else tmp_path / "last.pt")
    with caplog.at_level(logging.WARNING, "rae_core"):
        assert ckpt.resume(model=model) == 10
    assert torch.all(model.weight == 10)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    why = "damaged, its sha256 differs from last.pt.sha256" if checksum else "cannot be loaded"
    assert line.startswith(f"train-generator: {tmp_path / 'last.pt'}: {why}")
    assert line.endswith("set aside as last.pt.damaged, falling back to prev.pt")
    assert (tmp_path / "last.pt.damaged").exists() and not (tmp_path / "last.pt").exists()
    assert ckpt.last_good == tmp_path / "prev.pt"
    ckpt.save(30, model=model)  # the damaged file is not rotated into prev.pt
    assert [safe_load(tmp_path / n)["step"] for n in ("last.pt", "prev.pt")] == [30, 10]


def test_with_both_checkpoints_damaged_training_starts_from_step_0(tmp_path, caplog):
    ckpt, model = _two_checkpoints(tmp_path)
    damage(tmp_path / "last.pt", "truncated")
    damage(tmp_path / "prev.pt", "empty")
    model.weight.data.fill_(-1)
    with caplog.at_level(logging.WARNING, "rae_core"):
        assert ckpt.resume(model=model) == 0
    assert torch.all(model.weight == -1)  # nothing of either was loaded
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2 and "last.pt" in lines[0] and "prev.pt" in lines[1]
    assert lines[1].endswith("set aside as prev.pt.damaged, starting from step 0")
    assert ckpt.last_good is None


def test_a_crash_inside_a_save_leaves_a_checkpoint_to_resume_from(tmp_path):
    """The two renames of a rotation, each the last thing a crash let happen."""
    ckpt, model = _two_checkpoints(tmp_path)
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    checksum_path(last).replace(checksum_path(prev))  # the checksum moved, not yet the file
    assert Checkpointer(tmp_path, "fp", "train-generator").resume(model=model) == 20
    last.replace(prev)  # both moved, the new last.pt not yet written
    assert Checkpointer(tmp_path, "fp", "train-generator").resume(model=model) == 20


def test_a_loop_resumes_from_the_checkpoint_before_a_truncated_one_as_if_uninterrupted(
        tmp_path, digits_root, caplog, one_thread):
    from rae_core.train import pretrain_encoder

    (tmp_path / "dataset").symlink_to(digits_root, target_is_directory=True)
    cfg = load_config(None, "smoke", ["data.root=dataset", "encoder.pretrain.ckpt_every=10",
                                      "encoder.pretrain.steps=30"])
    loop = {"cfg": cfg.to_dict(), "root": str(tmp_path), "run_dir": str(tmp_path / "ckpt"),
            "fingerprint": "t"}
    encoder = Paths.at(tmp_path).encoder_dir / "encoder.pt"
    pretrain_encoder.train_loop(loop)
    first = safe_load(encoder)
    damage(tmp_path / "ckpt" / "last.pt", "truncated")  # step 30; prev.pt holds step 20
    with caplog.at_level(logging.WARNING, "rae_core"):
        assert pretrain_encoder.train_loop(loop)["resumed_at"] == 20
    assert any("last.pt: damaged" in m and m.endswith("falling back to prev.pt")
               for m in caplog.messages)
    again = safe_load(encoder)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


@pytest.fixture
def project(tmp_path, digits_root, monkeypatch, one_thread):
    """An untrained smoke encoder, its statistics and 4 latent shards, made in this process."""
    from rae_core.encoders import build_encoder
    from rae_core.train import runner

    monkeypatch.setattr(runner, "map_shards", lambda fn, args, cfg, desc=None:
                        [fn(*a) for a in args])
    (tmp_path / "dataset").symlink_to(digits_root, target_is_directory=True)
    cfg = load_config(None, "smoke", ["data.root=dataset"])
    paths = Paths.at(tmp_path)
    atomic_save(build_encoder("mae-micro", 32, random_init=True).state_dict(),
                paths.encoder_dir / "encoder.pt")
    stages.stats(cfg, paths)
    assert stages.extract(cfg, paths)["shards"] == 4
    return cfg, paths


def test_extract_remakes_damaged_shards_and_says_so(project, caplog):
    from rae_core.data.latents import shard_name

    cfg, paths = project
    out = paths.latents_dir
    before = {i: safe_load(out / shard_name(i)) for i in range(4)}
    signed = signature([out], paths.root)
    for i, how in enumerate(DAMAGE, start=1):
        damage(out / shard_name(i), how)
    with caplog.at_level(logging.WARNING, "rae_core"):
        summary = stages.extract(cfg, paths)
    assert summary["reused_shards"] == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"extract: {out / shard_name(i)}: damaged, its sha256 differs from "
                      f"{shard_name(i)}.sha256; re-making it" for i in (1, 2, 3)]
    for i in range(4):
        verify(out / shard_name(i))
        again = safe_load(out / shard_name(i))
        assert all(torch.equal(before[i][k], again[k]) for k in ("latents", "labels"))
    assert signature([out], paths.root) == signed  # what train-generator read is back


def test_a_shard_without_its_checksum_is_remade_when_it_fails_to_load(project, caplog):
    from rae_core.data.latents import shard_name

    cfg, paths = project
    shard = paths.latents_dir / shard_name(0)
    checksum_path(shard).unlink()
    damage(shard, "empty")
    with caplog.at_level(logging.WARNING, "rae_core"):
        assert stages.extract(cfg, paths)["reused_shards"] == 3
    assert f"extract: {shard}: cannot be loaded (RuntimeError); re-making it" in caplog.messages
    verify(shard)


def test_training_on_a_damaged_shard_fails_in_one_line(project):
    from rae_core.autoencoder import load_encoder, load_stats, stats_identity
    from rae_core.data.latents import ShardSource, shard_name

    cfg, paths = project
    encoder = load_encoder(cfg, paths)
    damage(paths.latents_dir / shard_name(2), "truncated")
    with pytest.raises(DataError) as err:
        ShardSource(paths.latents_dir, load_stats(cfg, paths, encoder),
                    stats_identity(cfg, encoder))
    head, tail = str(err.value).split(" (", 1)
    assert head == f"{paths.latents_dir / shard_name(2)}: cannot be loaded"
    assert tail.endswith("); re-make it with `rae stage extract --force`") and "\n" not in tail


@pytest.mark.parametrize("how, checksum", [("truncated", True), ("zeroed", True),
                                           ("empty", False)])
def test_damaged_statistics_fail_in_one_line_and_the_stats_stage_remakes_them(project, how,
                                                                               checksum):
    from rae_core.autoencoder import load_encoder, load_stats

    cfg, paths = project
    encoder = load_encoder(cfg, paths)
    good = load_stats(cfg, paths, encoder)
    signed = signature([paths.stats_file.parent], paths.root)
    damage(paths.stats_file, how)
    if not checksum:
        checksum_path(paths.stats_file).unlink()
    with pytest.raises(DataError) as err:
        load_stats(cfg, paths, encoder)
    why = "damaged, its sha256 differs from stats.pt.sha256" if checksum else \
        "cannot be loaded (EOFError)"
    assert str(err.value) == (f"{paths.stats_file}: {why}; "
                              "re-make it with `rae stage stats --force`")
    stages.stats(cfg, paths)
    remade = load_stats(cfg, paths, encoder)
    assert torch.equal(remade.mean, good.mean) and torch.equal(remade.var, good.var)
    assert signature([paths.stats_file.parent], paths.root) == signed

"""Retention of the generator's EMA snapshots (generator.keep_snapshots)."""

from __future__ import annotations

import pytest

from rae_core.train.common import prune_snapshots


def _steps(run_dir) -> list[int]:
    return [int(p.stem.removeprefix("ema-step")) for p in sorted(run_dir.glob("ema-step*.pt"))]


def _save_and_prune(run_dir, steps, keep) -> None:
    for step in steps:  # as the training loop does: save a snapshot, then prune
        (run_dir / f"ema-step{step:07d}.pt").write_bytes(b"ema")
        prune_snapshots(run_dir, keep)
        assert not keep or len(_steps(run_dir)) <= keep


def test_all_snapshots_stay_by_default(tmp_path):
    _save_and_prune(tmp_path, range(100, 2100, 100), keep=0)
    assert _steps(tmp_path) == list(range(100, 2100, 100))


@pytest.mark.parametrize("keep", [2, 3, 5, 8])
def test_kept_snapshots_span_the_run_evenly(tmp_path, keep):
    _save_and_prune(tmp_path, range(100, 10_100, 100), keep=keep)
    kept = _steps(tmp_path)
    assert len(kept) == keep and kept[0] == 100 and kept[-1] == 10_000
    gaps = [b - a for a, b in zip(kept, kept[1:], strict=False)]
    ideal = (10_000 - 100) / (keep - 1)
    assert max(gaps) <= 2 * ideal  # never one long stretch without a snapshot


def test_one_kept_snapshot_is_the_newest_and_other_files_are_untouched(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"resume")
    (tmp_path / "prev.pt").write_bytes(b"resume")
    _save_and_prune(tmp_path, range(200, 1200, 200), keep=1)
    assert _steps(tmp_path) == [1000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema-step0001000.pt", "last.pt",
                                                          "prev.pt"]


def test_pruning_is_the_same_after_a_resume(tmp_path):
    """A run resumed midway prunes to the same set as one that never stopped."""
    straight, resumed = tmp_path / "a", tmp_path / "b"
    straight.mkdir()
    resumed.mkdir()
    _save_and_prune(straight, range(50, 3050, 50), keep=4)
    _save_and_prune(resumed, range(50, 1550, 50), keep=4)
    _save_and_prune(resumed, range(1550, 3050, 50), keep=4)
    assert _steps(straight) == _steps(resumed)


def test_retention_is_not_part_of_a_runs_identity():
    """Keeping fewer snapshots resumes the same run: checkpoints are keyed by the fingerprint."""
    from rae_core.presets import load_config

    a = load_config(None, "tiny")
    b = load_config(None, "tiny", ["generator.keep_snapshots=3"])
    assert b.generator.keep_snapshots == 3
    assert a.fingerprint("generator") == b.fingerprint("generator")
    assert a.fingerprint() == b.fingerprint()
    assert load_config(None, "imagenet256").generator.keep_snapshots == 20

"""Data and weight problems stop a run in one line before any server or worker starts, and an
error raised inside a Ray worker reaches the user as its own line, whatever its class."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from flows.pipeline import one_line
from rae_core import errors
from rae_core.train.common import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]


def _folder(path: Path, classes: int = 3) -> Path:
    for split, n in (("train", 3), ("val", 1)):
        for c in range(classes):
            (path / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (80 * c, 40, 200)).save(path / split / f"c{c}" / f"{i}.png")
    return path


def _damage_empty_class(d: Path) -> None:
    for f in (d / "train" / "c1").iterdir():
        f.unlink()


def _damage_corrupt_file(d: Path) -> None:
    (d / "train" / "c0" / "0.png").write_bytes(b"\x89PNG not really")


def _damage_missing_val(d: Path) -> None:
    for f in sorted((d / "val").rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    (d / "val").rmdir()


CASES = {
    "empty class": (_damage_empty_class, [], "c1: empty class"),
    "corrupt file": (_damage_corrupt_file, [], "unreadable or corrupt images"),
    "missing folder": (_damage_missing_val, [], "val: dataset folder not found"),
    "class count": (None, ["data.num_classes=5"], "3 classes found but data.num_classes is 5"),
    "weights file": (None, ["encoder.weights=/nonexistent/mae.pt"],
                     "encoder.weights: /nonexistent/mae.pt not found"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_data_or_weights_problem_stops_the_run_before_anything_starts(tmp_path, case):
    damage, extra, expected = CASES[case]
    data = _folder(tmp_path / "images")
    if damage:
        damage(data)
    proj = tmp_path / "proj"
    proj.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_HOME")}
    sets = ["data.dataset=folder", f"data.source={data}", "data.num_classes=3", *extra]
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke"]
    for s in sets:
        cmd += ["--set", s]
    res = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rae: error: ") and expected in lines[0], \
        res.stderr[-2000:]
    # nothing was started: no services record, no Prefect home, no tracking store, no Ray
    assert not (proj / ".prefect").exists() and not (proj / "mlflow.db").exists()


class Custom(Exception):
    pass


RAISED = [errors.RaeError("stage: a plain platform error"),
          errors.ConfigError("generator.steps: 0 is out of range (valid: >= 1)"),
          errors.DataError("data/dataset/train: no class sub-folders"),
          errors.WeightsMissingError("/w/mae.pt: weights file not found; set encoder.weights"),
          NonFiniteError("train-generator: step 12: 10 non-finite steps in a row after fp32"),
          Custom("\x1b[31mcoloured\x1b[0m last line")]


def _raise(e: BaseException) -> None:
    raise e


@pytest.fixture(scope="module")
def ray_local():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def test_every_error_a_worker_raises_reaches_the_user_as_its_own_line(ray_local):
    task = ray_local.remote(max_retries=0)(_raise)
    for raised in RAISED:
        with pytest.raises(Exception) as caught:
            ray_local.get(task.remote(raised))
        assert "ray::" in str(caught.value)  # Ray's wrapper, traceback and all
        want = str(raised) if isinstance(raised, errors.RaeError) else "Custom: coloured last line"
        assert one_line(caught.value) == want

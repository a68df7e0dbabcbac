"""`dvc plots show` renders the loss curve a real training loop wrote, across a resume, from the
files and plot definitions of the project's dvc.yaml."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import GIT_IDENTITY

from rae_core.paths import Paths
from rae_core.plots import plot_file
from rae_core.presets import load_config, preset_yaml
from rae_core.train import pretrain_encoder

ROOT = Path(__file__).resolve().parents[1]


def _loop(root: Path, steps: int) -> None:
    """The pretrain-encoder loop in this process; the same fingerprint for both lengths, so
    the longer run resumes from the shorter one's last checkpoint."""
    cfg = load_config(None, "smoke", ["data.root=dataset", "encoder.pretrain.ckpt_every=10",
                                      f"encoder.pretrain.steps={steps}"])
    pretrain_encoder.train_loop({"cfg": cfg.to_dict(), "root": str(root),
                                 "run_dir": str(root / "runs" / "checkpoints" / "pe"),
                                 "fingerprint": "fixed"})


def _dvc(root: Path, *args: str) -> str:
    env = {**os.environ, **GIT_IDENTITY, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"dvc {args}: {res.stderr[-2000:]}"
    return res.stdout


def test_dvc_plots_show_the_whole_loss_curve_of_a_resumed_loop(tmp_path, digits_root, one_thread):
    root = tmp_path / "project"
    root.mkdir()
    (root / "dataset").symlink_to(digits_root, target_is_directory=True)
    _loop(root, 20)
    plots = plot_file(Paths.at(root), "pretrain-encoder")
    assert [r["step"] for r in json.loads(plots.read_text())] == [10, 20]
    plots.unlink()  # as DVC removes a stage's outputs before it runs the stage again
    _loop(root, 30)  # resumes at step 20: the rows before it come from beside the checkpoint
    rows = json.loads(plots.read_text())
    assert [r["step"] for r in rows] == [10, 20, 30]

    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(preset_yaml("smoke"))  # dvc.yaml's paths come from it
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(root, "init", "-q")
    shown = json.loads(_dvc(root, "plots", "show", "--json"))
    (plot,) = shown["data"]["runs/plots/pretrain-encoder.json"]
    assert plot["content"]["title"]["text"] == "pretrain-encoder loss"
    points = plot["content"]["data"]["values"]
    assert [(int(p["step"]), float(p["loss"])) for p in points] == \
        [(r["step"], r["loss"]) for r in rows]
    assert all(r["loss"] > 0 for r in rows)

"""dvc.yaml's paths follow params.yaml: every preset's data folder is the one DVC tracks, and the
stage records (rae_core/provenance.py) sign the same files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rae_core import provenance
from rae_core.config import from_dict
from rae_core.presets import PRESETS, preset, preset_yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    """A DVC project (no git) with this checkout's dvc.yaml and the code it depends on."""
    root = tmp_path_factory.mktemp("dvc-paths")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "rae_core", root / "rae_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=root, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return root


def _dvc_outs(root: Path) -> dict[str, set[str]]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {s.name: {str(Path(o.fs_path).relative_to(root)) for o in s.outs}
                for s in repo.index.stages}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_presets_outputs_are_where_dvc_tracks_them(dvc_project, name):
    (dvc_project / "params.yaml").write_text(preset_yaml(name))
    outs = _dvc_outs(dvc_project)
    cfg = from_dict(preset(name))
    for stage in provenance.SPECS:
        assert set(provenance.outputs(stage, cfg)) <= outs[stage], stage
    data = {cfg.data.root, f"{cfg.data.root}.json"}
    assert data <= outs["prepare"]
    assert not any(p.startswith("data/dataset") for p in outs["prepare"] - data)


def test_dvc_status_after_rae_params_names_the_imagenet_folders(dvc_project):
    """`dvc repro --dry` stops at the first stage whose input is not made yet in a new project;
    `dvc status` walks every stage."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([BIN / "rae", "params", "--preset", "imagenet256"], cwd=dvc_project,
                   env=env, check=True, capture_output=True)
    res = subprocess.run([BIN / "dvc", "status"], cwd=dvc_project, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln.split() for ln in res.stdout.splitlines()]
    assert ["deleted:", "data/imagenet.json"] in lines
    assert sum(ln == ["deleted:", "data/imagenet"] for ln in lines) == 5  # prepare's out,
    assert "data/dataset" not in res.stdout  # and the input of the four stages that read it

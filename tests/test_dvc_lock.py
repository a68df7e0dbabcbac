"""flows.dvc_lock: which `rae run`s record their outputs in dvc.lock (the recording itself is
checked end to end in tests/test_pipeline_e2e.py)."""

import subprocess

import pytest

from flows import dvc_lock
from rae_core.presets import load_config


@pytest.fixture
def dvc_project(tmp_path, monkeypatch):
    from flows.cli import main

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["params", "--preset", "smoke"]) == 0
    return tmp_path


def test_a_run_of_params_yaml_commits_its_stages(dvc_project, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw["cwd"])) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))
    cfg = load_config(str(dvc_project / "params.yaml"), None, [])
    line = dvc_lock.record(cfg, dvc_project, ["prepare", "stats"])
    assert line == "dvc.lock: recorded the outputs of 2 stages (`dvc push` shares them)"
    ((cmd, cwd),) = calls
    assert cmd[1:] == ["commit", "--force", "--quiet", "prepare", "stats"] and cwd == dvc_project


def test_a_run_of_other_params_leaves_dvc_lock_alone(dvc_project, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("dvc commit ran"))
    cfg = load_config(str(dvc_project / "params.yaml"), None, ["seed=1"])
    assert dvc_lock.record(cfg, dvc_project, ["prepare"]).startswith(
        "dvc.lock: not updated, this run's parameters are not params.yaml's")


def test_a_failed_commit_says_why_in_one_line(dvc_project, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: output 'models/encoder' does not exist\n"))
    cfg = load_config(str(dvc_project / "params.yaml"), None, [])
    assert dvc_lock.record(cfg, dvc_project, ["pretrain-encoder"]) == \
        "dvc.lock: not updated (ERROR: output 'models/encoder' does not exist)"


def test_outside_a_dvc_project_nothing_is_said(tmp_path):
    cfg = load_config(None, "smoke", [])
    assert dvc_lock.record(cfg, tmp_path, ["prepare"]) is None

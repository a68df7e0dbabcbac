"""`rae runs` and `rae compare` on pipeline runs that the test logs itself."""

import json

import pytest

from flows import tracking
from flows.cli import main
from flows.history import compare_runs, pipeline_runs
from rae_core.presets import load_config


def _pipeline(root, overrides, fid):
    cfg = load_config(None, "smoke", overrides)
    parent = tracking.start_run(cfg, root, "pipeline-smoke", tags={"rae.kind": "pipeline"})
    for stage in ("train-generator", "evaluate"):
        run = tracking.start_run(cfg, root, stage, parent, tags={"rae.stage": stage})
        if stage == "evaluate":
            tracking.log_numbers(run, {"fid": fid, "class_accuracy": 0.9})
        else:
            tracking.log_numbers(run, {"loss": 0.5}, prefix="stage.")
        tracking.end_run(run)
    tracking.end_run(parent)
    return parent


@pytest.fixture
def two_runs(local_mlflow, tmp_path):
    a = _pipeline(tmp_path, ["generator.steps=60"], 12.5)
    b = _pipeline(tmp_path, ["generator.steps=90", "generator.lr=5e-4"], 9.25)
    return a, b


def test_runs_lists_pipelines_newest_first_with_their_fid(two_runs):
    a, b = two_runs
    runs = pipeline_runs("rae")
    assert [r["run_id"] for r in runs] == [b, a]
    assert [r["fid"] for r in runs] == [9.25, 12.5]
    assert all(r["status"] == "FINISHED" and r["preset"] == "smoke" for r in runs)
    assert pipeline_runs("rae", limit=1)[0]["run_id"] == b
    assert pipeline_runs("no-such-experiment") == []


def test_compare_shows_only_the_params_that_differ_and_every_metric(two_runs):
    a, b = two_runs
    diff = compare_runs(a, b)
    params = {k: (x, y) for k, x, y in diff["params"]}
    assert set(params) == {"generator.steps", "generator.lr"}  # nothing else differs
    assert params["generator.steps"] == ("60", "90")
    assert float(params["generator.lr"][1]) == 5e-4
    metrics = {k: (x, y) for k, x, y in diff["metrics"]}
    assert metrics["evaluate.fid"] == (12.5, 9.25)
    assert metrics["train-generator.stage.loss"] == (0.5, 0.5)


def test_the_commands_print_what_the_functions_return(two_runs, capsys):
    a, b = two_runs
    assert main(["runs", "--experiment", "rae", "--format", "json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [b, a]
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["param", a[:12], b[:12]]
    assert any(line.split()[:3] == ["evaluate.fid", "12.5", "9.25"] for line in out.splitlines())


def test_a_training_stage_records_the_machine_it_ran_on(local_mlflow, tmp_path):
    import time

    run = tracking.start_run(load_config(None, "smoke"), tmp_path, "train-generator")
    with tracking.system_metrics(run, interval_s=0.2):
        time.sleep(1.5)
    tracking.end_run(run)
    keys = set(tracking.client().get_run(run).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    history = tracking.client().get_metric_history(run, "system/cpu_utilization_percentage")
    assert len(history) >= 2  # a curve, not one number


def test_the_stages_dvc_runs_one_by_one_join_one_pipeline_run(local_mlflow, tmp_path,
                                                                monkeypatch):
    """Under DVC, each stage's command finds the pipeline run its configuration's earlier
    stages left open in the project; another experiment, a finished pipeline or another
    configuration gets its own, and a failed one is joined again by the rerun."""
    cfg = load_config(None, "smoke")
    monkeypatch.setenv("DVC_STAGE", "prepare")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    first = tracking.dvc_pipeline_run(cfg, tmp_path, {})
    assert tracking.dvc_pipeline_run(cfg, tmp_path, {}) == first
    other = load_config(None, "smoke", ["generator.steps=61"])
    assert tracking.dvc_pipeline_run(other, tmp_path, {}) != first
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lamb")
    exp = tracking.dvc_pipeline_run(cfg, tmp_path, {})
    assert exp != first
    tracking.end_run(exp, "FAILED", "killed")
    assert tracking.dvc_pipeline_run(cfg, tmp_path, {}) == exp
    tracking.end_run(exp)
    assert tracking.dvc_pipeline_run(cfg, tmp_path, {}) not in (exp, first)
    runners = {r["run_id"]: r["runner"] for r in pipeline_runs("rae")}
    assert runners[first] == "dvc repro" and runners[exp] == "dvc exp run lucky-lamb"
    resumed = tracking.client().get_run(exp).data.tags
    assert "rae.resumed" not in resumed and resumed["rae.kind"] == "pipeline"

"""The reproducibility flow: baseline on first run, pass within tolerance, a failed Prefect flow
run and a FAILED MLflow run with the report when a metric drifts. The pipeline itself is
replaced by one that writes chosen metrics (the real one runs in the team-mode test)."""

import json
import math

import pytest

from rae_core.drift import DriftError, compare, raise_on_drift, report_markdown


def test_compare_applies_absolute_tolerances_and_missing_metrics_drift():
    checks = compare({"fid": 10.0, "recall": 0.5, "rfid": 1.0},
                     {"fid": 10.4, "recall": 0.45}, {"fid": 0.5, "recall": 0.03, "rfid": 0.5,
                                                     "precision": 0.1})
    by = {c.metric: c for c in checks}
    assert set(by) == {"fid", "recall", "rfid"}  # precision: no baseline, nothing to compare
    assert by["fid"].ok and by["fid"].delta == pytest.approx(0.4)
    assert not by["recall"].ok and not by["rfid"].ok and math.isnan(by["rfid"].now)
    with pytest.raises(DriftError, match=r"recall 0.45 vs baseline 0.5 \(tolerance 0.03\)"):
        raise_on_drift(checks, "x")
    table = report_markdown(checks, "t")
    assert "| fid | 10.0000 | 10.4000 | +0.4000 | 0.5 | pass |" in table
    assert table.count("DRIFT") == 2


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_reproduce_flow_records_a_baseline_then_flags_drift(tmp_path, monkeypatch, harness,
                                                            local_mlflow):
    mlflow = local_mlflow
    from flows import reproduce

    metrics = {"fid": 12.0, "precision": 0.7, "recall": 0.6, "class_accuracy": 0.9}
    runs_seen = []

    def fake_pipeline(cfg_dict, root):
        runs_seen.append(root)
        out = tmp_path / "project" / "runs" / "reproduce" / "smoke" / "run" / "runs" / "evaluate"
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({**metrics, "extractor": "domain"}))

    monkeypatch.setattr(reproduce, "pipeline_flow", fake_pipeline)
    project = str(tmp_path / "project")
    first = reproduce.reproduce_flow("smoke", project)
    assert "baseline" in first["title"] and first["drifted"] == []
    second = reproduce.reproduce_flow("smoke", project)
    assert "against baseline run" in second["title"] and second["drifted"] == []

    metrics["fid"] = 13.0  # beyond the smoke preset's 0.5 tolerance
    state = reproduce.reproduce_flow("smoke", project, return_state=True)
    assert state.is_failed()
    with pytest.raises(DriftError, match="fid 13 vs baseline 12"):
        state.result()
    assert len(runs_seen) == 3

    runs = mlflow.search_runs(experiment_names=["rae-reproduce"], output_format="list",
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED", "FAILED"]
    assert [r.data.tags.get("rae.verdict") for r in runs] == ["pass", "pass", "drift"]
    assert runs[0].data.tags["rae.baseline"] == "true" and "rae.baseline" not in runs[2].data.tags
    assert runs[2].data.tags["rae.baseline_run"] == runs[0].info.run_id
    assert len({r.data.tags["rae.config_key"] for r in runs}) == 1
    report = json.loads(mlflow.artifacts.load_text(
        f"runs:/{runs[2].info.run_id}/reproduce-report.json"))
    assert report["drifted"] == ["fid"]
    (fid,) = [c for c in report["checks"] if c["metric"] == "fid"]
    assert (fid["baseline"], fid["now"], fid["tolerance"], fid["ok"]) == (12.0, 13.0, 0.5, False)

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:  # the drift report, in the Prefect UI
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["drift-smoke"])))
    assert len(arts) == 3 and {a.type for a in arts} == {"markdown"}
    assert any("| fid | 12.0000 | 13.0000 | +1.0000 | 0.5 | DRIFT |" in a.data for a in arts)


def test_serve_schedules_the_smoke_and_tiny_reproductions_from_params(tmp_path):
    from flows.scheduled import deployments
    from rae_core.presets import load_config

    cfg = load_config(None, "tiny", ["schedule.nightly=15 2 * * *"])
    nightly, weekly = deployments(cfg, tmp_path)
    assert (nightly.name, weekly.name) == ("reproduce-smoke", "reproduce-tiny")
    assert nightly.parameters == {"preset": "smoke", "root": str(tmp_path)}
    assert weekly.parameters["preset"] == "tiny"
    crons = [d.schedules[0].schedule.cron for d in (nightly, weekly)]
    assert crons == ["15 2 * * *", "0 4 * * 0"]
    assert nightly.entrypoint.endswith("reproduce.py:reproduce_flow")

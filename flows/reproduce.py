"""The reproducibility flow: re-run a pinned configuration from scratch and compare its metrics
with the recorded baseline run of that configuration; any drift fails the flow run.

A pinned configuration is a preset (plus overrides) at a code revision, on DVC-locked data.
Each run works in `runs/reproduce/<preset>/run/`, logs to the `schedule.experiment` MLflow
experiment (off the leaderboard), and writes a report: every metric with its baseline, value
now, tolerance and verdict. The first run of a configuration records itself as its baseline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from prefect import flow

from flows import tracking
from flows.artifacts import markdown_report
from flows.pipeline import pipeline_flow
from flows.source import code_revision, flow_run_name
from rae_core.config import Config
from rae_core.drift import compare, raise_on_drift, report_markdown, report_rows
from rae_core.locking import project_lock
from rae_core.paths import Paths
from rae_core.presets import load_config
from rae_core.store import write_json

log = logging.getLogger(__name__)
KIND = "reproduce"
# what decides the numbers; schedules, tracking and the Ray layout do not
RESULT_SECTIONS = ("seed", "data", "autoencoder", "encoder", "stats", "extract", "decoder",
                   "generator", "sample", "evaluate")


def data_lock(root: Path) -> str:
    """A digest of the data outputs DVC locked (dvc.lock's `prepare` stage), or `unlocked`."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return "unlocked"
    prepare = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("prepare", {})
    outs = json.dumps(prepare.get("outs", []), sort_keys=True)
    return hashlib.sha256(outs.encode()).hexdigest()[:12]


def _baseline(experiment: str, key: str):
    import mlflow

    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                              filter_string=f"tags.`rae.kind` = '{KIND}' and "
                                            f"tags.`rae.config_key` = '{key}' and "
                                            "tags.`rae.baseline` = 'true' and "
                                            "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def _evaluation(work: Path) -> dict[str, float]:
    metrics = json.loads((Paths.at(work).evaluate_dir / "metrics.json").read_text())
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


@flow(name="rae-reproduce", flow_run_name=flow_run_name)
def reproduce_flow(preset: str, root: str | None = None,
                   overrides: list[str] | None = None) -> dict:
    """Re-run `preset` (plus `overrides`) from scratch; fail when a metric drifts."""
    project = Path(root or ".").resolve()
    cfg = load_config(None, preset, list(overrides or []))
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"experiment": cfg.schedule.experiment})})
    slot = project / "runs" / "reproduce" / preset
    work = slot / "run"
    with project_lock(slot, f"reproduce {preset}"):
        shutil.rmtree(work, ignore_errors=True)  # from scratch: nothing reused from last time
        pipeline_flow(cfg, str(work))
        now = _evaluation(work)
    return _judge(cfg, project, work, now)


def _judge(cfg: Config, project: Path, work: Path, now: dict[str, float]) -> dict:
    key = cfg.fingerprint(*RESULT_SECTIONS)
    tags = {"rae.kind": KIND, "rae.config_key": key, "rae.code_revision": code_revision(project),
            "rae.data_lock": data_lock(project)}
    base = _baseline(cfg.tracking.experiment, key)
    run_id = tracking.start_run(cfg, work, f"reproduce-{cfg.preset}", tags=tags)
    tracking.log_numbers(run_id, now)
    tolerances = cfg.schedule.tolerance.model_dump()
    if base is None:
        tracking.client().set_tag(run_id, "rae.baseline", "true")
        checks, title = compare(now, now, tolerances), f"{cfg.preset}: recorded as the baseline"
    else:
        checks = compare(base.data.metrics, now, tolerances)
        title = f"{cfg.preset} against baseline run {base.info.run_id}"
        tracking.client().set_tag(run_id, "rae.baseline_run", base.info.run_id)
    report = {"title": title, "config_key": key, "checks": report_rows(checks),
              "drifted": [c.metric for c in checks if not c.ok], **tags}
    write_json(work / "reproduce-report.json", report)
    (work / "reproduce-report.md").write_text(report_markdown(checks, title))
    c = tracking.client()
    for name in ("reproduce-report.json", "reproduce-report.md"):
        c.log_artifact(run_id, str(work / name))
    c.set_tag(run_id, "rae.verdict", "drift" if report["drifted"] else "pass")
    markdown_report(work / "reproduce-report.md", f"drift-{cfg.preset}", title)
    try:
        raise_on_drift(checks, f"reproduction of {cfg.preset} ({key})")
    except Exception as e:
        tracking.end_run(run_id, "FAILED", str(e))
        raise
    tracking.end_run(run_id)
    log.info("%s: %s", title, "no drift" if base is not None else "baseline recorded")
    return report

"""What ran: recent pipeline runs (`rae runs`) and two runs side by side (`rae compare`), read
from MLflow. A pipeline run is the parent of its stages' runs (those of one `rae run`, or of
one `dvc repro` or `dvc exp run`); its numbers are theirs."""

from __future__ import annotations

import json
import time
from typing import Any

RUN_COLUMNS = ("started", "status", "runner", "preset", "commit", "wall_s", "fid", "run_id")


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _commit(tags: dict[str, str]) -> str:
    commit = tags.get("mlflow.source.git.commit", "")
    return commit[:12] + ("+dirty" if tags.get("rae.git.dirty") == "true" else "")


def pipeline_runs(experiment: str, limit: int = 20) -> list[dict[str, Any]]:
    """The most recent pipeline runs of `experiment`, newest first, each with its evaluation's
    FID when it got that far."""
    c = _client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    parents = c.search_runs([exp.experiment_id], "tags.`rae.kind` = 'pipeline'",
                            max_results=limit, order_by=["attributes.start_time DESC"])
    evals = c.search_runs([exp.experiment_id], "tags.`rae.stage` = 'evaluate'",
                          max_results=5000)
    fid = {r.data.tags.get("mlflow.parentRunId"): r.data.metrics.get("fid") for r in evals}
    out = []
    for r in parents:
        end = r.info.end_time or int(time.time() * 1000)
        out.append({"started": time.strftime("%Y-%m-%d %H:%M",
                                             time.localtime(r.info.start_time / 1000)),
                    "status": r.info.status,
                    "runner": r.data.tags.get("rae.runner", "rae run"),
                    "preset": r.data.tags.get("rae.preset", ""),
                    "commit": _commit(r.data.tags),
                    "wall_s": round((end - r.info.start_time) / 1000),
                    "fid": fid.get(r.info.run_id), "run_id": r.info.run_id})
    return out


def _numbers(run_id: str) -> tuple[dict[str, str], dict[str, float]]:
    """A run's params and metrics; a pipeline run adds its stages' metrics as `stage.metric`."""
    c = _client()
    run = c.get_run(run_id)
    metrics = dict(run.data.metrics)
    if run.data.tags.get("rae.kind") == "pipeline":
        children = c.search_runs([run.info.experiment_id],
                                 f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=1000)
        for child in children:
            stage = child.data.tags.get("rae.stage", child.info.run_name)
            metrics.update({f"{stage}.{k}": v for k, v in child.data.metrics.items()})
    return dict(run.data.params), metrics


def compare_runs(run_a: str, run_b: str) -> dict[str, list[list[Any]]]:
    """The params that differ between two runs, and every metric of either, side by side."""
    params_a, metrics_a = _numbers(run_a)
    params_b, metrics_b = _numbers(run_b)
    params = [[k, params_a.get(k, ""), params_b.get(k, "")]
              for k in sorted(params_a.keys() | params_b.keys())
              if params_a.get(k) != params_b.get(k)]
    metrics = [[k, metrics_a.get(k, ""), metrics_b.get(k, "")]
               for k in sorted(metrics_a.keys() | metrics_b.keys())]
    return {"params": params, "metrics": metrics}


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """Rows under a header, each column as wide as its widest cell."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    line = "  ".join(f"{{:<{w}}}" for w in widths).format
    return "\n".join([line(*header), *(line(*r) for r in cells)])


def render_runs(runs: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(runs, indent=1)
    if not runs:
        return "no pipeline runs yet: run `rae run` (or `make demo`) first"
    return table(list(RUN_COLUMNS), [[r[c] for c in RUN_COLUMNS] for r in runs])


def render_comparison(diff: dict[str, list[list[Any]]], run_a: str, run_b: str,
                      fmt: str) -> str:
    if fmt == "json":
        return json.dumps({"runs": [run_a, run_b], **diff}, indent=1)
    a, b = run_a[:12], run_b[:12]
    params = table(["param", a, b], diff["params"]) if diff["params"] else \
        "no param differs"
    return f"{params}\n\n{table(['metric', a, b], diff['metrics'])}"

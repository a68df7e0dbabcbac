"""The FID leaderboard: evaluation runs grouped by what makes their numbers comparable."""

from __future__ import annotations

import json
from typing import Any

GROUP_TAGS = ("dataset", "resolution", "extractor", "num_samples")
ROW_TAGS = ("family", "model", "encoder", "decoder", "steps", "sampler", "sampling_steps", "guidance",
            "scale", "preset")
METRICS = ("fid", "precision", "recall", "class_accuracy", "inception_score", "rfid")


def rows(experiment: str) -> list[dict[str, Any]]:
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id],
                              filter_string="tags.`rae.kind` = 'evaluation' and "
                                            "attributes.status = 'FINISHED'",
                              order_by=["metrics.fid ASC"], output_format="list")
    out = []
    for r in runs:
        t, m = r.data.tags, r.data.metrics
        if "fid" not in m:
            continue
        row = {"group": " / ".join(f"{k}={t.get('rae.' + k, '?')}" for k in GROUP_TAGS),
               "run_id": r.info.run_id, "generator_version": t.get("rae.generator_version", "")}
        row.update({k: t.get(f"rae.{k}", "") for k in ROW_TAGS})
        row.update({k: m[k] for k in METRICS if k in m})
        out.append(row)
    return sorted(out, key=lambda r: (r["group"], r["fid"]))


def render(board: list[dict[str, Any]], top: int, fmt: str) -> str:
    groups: dict[str, list[dict]] = {}
    for r in board:
        groups.setdefault(r["group"], []).append(r)
    groups = {g: rs[:top] for g, rs in groups.items()}
    if fmt == "json":
        return json.dumps(groups, indent=1)
    if not groups:
        return "no evaluations yet: run `rae run` (or `make demo`) first"
    cols = ["rank", "fid", "precision", "recall", "class_accuracy", "family", "model", "encoder",
            "steps",
            "sampler", "sampling_steps", "guidance", "scale", "preset", "run_id"]
    blocks = []
    for g, rs in groups.items():
        table = [[str(i + 1)] + [_fmt(r.get(c, "")) for c in cols[1:]] for i, r in enumerate(rs)]
        if fmt == "md":
            lines = [f"### {g}", "", "| " + " | ".join(cols) + " |",
                     "|" + "---|" * len(cols)] + ["| " + " | ".join(x) + " |" for x in table]
        else:
            widths = [max(len(c), *(len(x[i]) for x in table)) for i, c in enumerate(cols)]
            fmt_row = "  ".join(f"{{:<{w}}}" for w in widths).format
            lines = [g, fmt_row(*cols)] + [fmt_row(*x) for x in table]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)[:12] if len(str(v)) > 12 and str(v).isalnum() else str(v)


def crown_champion(experiment: str, registered_name: str, group: str,
                   family: str) -> str | None:
    """Give the alias `champion` of `registered_name` (one family's generators) to its version
    with the best FID in `group`."""
    from mlflow.tracking import MlflowClient

    best = [r for r in rows(experiment)
            if r["group"] == group and r["family"] == family and r["generator_version"]]
    if not best:
        return None
    version = best[0]["generator_version"]
    MlflowClient().set_registered_model_alias(registered_name, "champion", version)
    return version

"""The FID leaderboard: evaluation runs grouped by what makes their numbers comparable.

A run's protocol is its extractor, its reference set (the dataset's training split, or an ADM
reference batch file: the paper's table is Inception pool_3 against ADM's batch, 50K samples)
and its sample count; runs of different protocols are never ranked together."""

from __future__ import annotations

import json
from typing import Any

GROUP_TAGS = ("dataset", "resolution", "extractor", "reference", "num_samples")
PROTOCOL_TAGS = ("extractor", "reference", "num_samples")
ROW_TAGS = ("family", "model", "encoder", "decoder", "steps", "sampler", "sampling_steps", "guidance",
            "scale", "preset")
METRICS = ("fid", "precision", "recall", "class_accuracy", "inception_score", "rfid",
           "images_per_s")


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
        row.update({k: t.get(f"rae.{k}", "") for k in GROUP_TAGS})
        row.update({k: t.get(f"rae.{k}", "") for k in ROW_TAGS})
        row.update({k: m[k] for k in METRICS if k in m})
        row["protocol"] = " / ".join(t.get(f"rae.{k}", "?") for k in PROTOCOL_TAGS)
        out.append(row)
    return sorted(out, key=lambda r: (r["group"], r["fid"]))


COLUMNS = ("rank", "fid", "precision", "recall", "class_accuracy", "images_per_s", "family",
           "model", "encoder", "steps", "sampler", "sampling_steps", "guidance", "scale",
           "preset", "protocol", "run_id")
NUMERIC = {"rank", "fid", "precision", "recall", "class_accuracy", "images_per_s", "steps",
           "sampling_steps", "scale"}


def render(board: list[dict[str, Any]], top: int, fmt: str) -> str:
    groups: dict[str, list[dict]] = {}
    for r in board:
        groups.setdefault(r["group"], []).append(r)
    groups = {g: rs[:top] for g, rs in groups.items()}
    if fmt == "json":
        return json.dumps(groups, indent=1)
    if not groups:
        return "no evaluations yet: run `rae run` (or `make demo`) first"
    tables = {g: [[str(i + 1)] + [_fmt(r.get(c, "")) for c in COLUMNS[1:]]
                  for i, r in enumerate(rs)] for g, rs in groups.items()}
    if fmt == "md":
        return "\n\n".join("\n".join([f"### {g}", "", "| " + " | ".join(COLUMNS) + " |",
                                       "|" + "---|" * len(COLUMNS)] +
                                      ["| " + " | ".join(x) + " |" for x in table])
                           for g, table in tables.items())
    return _rich_tables(tables)


def _rich_tables(tables: dict[str, list[list[str]]]) -> str:
    """One rich table per group, best first (in bold); coloured and fitted to the terminal when
    stdout is one, plain and never wrapped otherwise."""
    import io
    import shutil
    import sys

    from rich.console import Console
    from rich.table import Table

    tty = sys.stdout.isatty()
    console = Console(file=io.StringIO(), force_terminal=tty,
                      width=shutil.get_terminal_size().columns if tty else 1000)
    for i, (g, rows) in enumerate(tables.items()):
        table = Table(title=g, title_justify="left", title_style="bold")
        for c in COLUMNS:
            table.add_column(c, justify="right" if c in NUMERIC else "left")
        for rank, row in enumerate(rows):
            table.add_row(*row, style="bold green" if rank == 0 else None)
        if i:
            console.print()
        console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)[:12] if len(str(v)) > 12 and str(v).isalnum() else str(v)


def crown_champion(experiment: str, registered_name: str, dataset: str, resolution: str,
                   family: str) -> str | None:
    """Give the alias `champion` of `registered_name` (one family's generators on one dataset
    and resolution) to its best version under the most thorough protocol it was evaluated
    with: the extractor and reference set with the most samples. FIDs of different protocols
    are not comparable, and a small evaluation must not take the alias from a better model
    measured on more samples."""
    from mlflow.tracking import MlflowClient

    scored = [r for r in rows(experiment)
              if r["family"] == family and r["generator_version"]
              and (r["dataset"], r["resolution"]) == (dataset, resolution)]
    if not scored:
        return None
    thorough = max(scored, key=lambda r: int(r["num_samples"] or 0))["num_samples"]
    protocols = sorted({r["group"] for r in scored if r["num_samples"] == thorough})
    best = min((r for r in scored if r["group"] == protocols[0]), key=lambda r: r["fid"])
    MlflowClient().set_registered_model_alias(registered_name, "champion",
                                              best["generator_version"])
    return best["generator_version"]

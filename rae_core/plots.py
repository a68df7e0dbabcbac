"""Training curves as files `dvc plots` reads: per training stage, runs/plots/<stage>.json, a
JSON list of {"step", "loss"} rows (DVC reads JSON, CSV, TSV and YAML, not the JSON lines of
the metrics log).

The metrics log starts afresh in every process, so the rows also live beside the stage's
checkpoint (curve.json in its run folder): a resumed stage keeps the rows up to the step it
resumes from, and its plot covers the whole run, not only the part after the restart.
"""

from __future__ import annotations

import json
from pathlib import Path

from rae_core.paths import Paths
from rae_core.store import write_json


def plot_file(paths: Paths, stage: str) -> Path:
    return paths.root / "runs" / "plots" / f"{stage}.json"


class LossCurve:
    """The loss rows of one training stage's run; `write` replaces both files atomically."""

    def __init__(self, paths: Paths, stage: str, run_dir: str | Path, start: int,
                 enabled: bool = True):
        self.files = (plot_file(paths, stage), Path(run_dir) / "curve.json")
        self.enabled = enabled
        self.rows = [r for r in _rows(self.files[1]) if r["step"] <= start] if enabled else []

    def add(self, step: int, loss: float) -> None:
        self.rows.append({"step": step, "loss": float(loss)})

    def write(self) -> None:
        if self.enabled:
            for f in self.files:
                write_json(f, self.rows)


def write_empty(paths: Paths, stage: str) -> None:
    """The plot of a stage that trains nothing this time (pretrained weights): no rows."""
    write_json(plot_file(paths, stage), [])


def _rows(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return []

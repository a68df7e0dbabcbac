"""Wall time of `dvc repro` against `rae run` on the same preset, each in a fresh folder.

`rae run` runs in a folder holding only params.yaml; `dvc repro` in a git + DVC project with this
checkout's dvc.yaml and the code it names as dependencies (as tests/test_pipeline_e2e.py sets it
up). Between repeats the shared services a `dvc repro` left are stopped, so every repro starts
them afresh, as the first one on a machine does.

Beside each wall time it reports the stages' own time (the sum of their `stage.wall_s` in
MLflow): what is left of a `dvc repro` is the cost of a process per stage and of DVC itself,
and what `rae run` gains beyond that is running train-decoder beside the other stages.

    .venv/bin/python bench/dvc_repro_timing.py [--preset smoke] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
            "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "PREFECT_API_URL", "RAY_ADDRESS",
                        "RAE_LOCAL_RAY")}
    return {**env, **IDENTITY, "PATH": f"{BIN}{os.pathsep}{env['PATH']}"}


def _run(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.time()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{res.stderr[-3000:]}")
    return time.time() - t0


def stage_seconds(proj: Path) -> float:
    """The sum of the stages' own wall times that the run logged to its MLflow store."""
    with contextlib.closing(sqlite3.connect(proj / "mlflow.db")) as db:
        return db.execute("SELECT sum(value) FROM metrics WHERE key = 'stage.wall_s'").fetchone()[0]


def rae_run(preset: str) -> tuple[float, float]:
    env = _env()
    with tempfile.TemporaryDirectory() as tmp:
        _run([str(BIN / "rae"), "params", "--preset", preset], Path(tmp), env)
        return _run([str(BIN / "rae"), "run"], Path(tmp), env), stage_seconds(Path(tmp))


def dvc_repro(preset: str) -> tuple[float, float]:
    from flows import services

    env = _env()
    with tempfile.TemporaryDirectory() as tmp:
        proj = Path(tmp)
        for item in ("dvc.yaml", "rae_core", "flows"):
            src = ROOT / item
            (shutil.copytree if src.is_dir() else shutil.copy)(src, proj / item)
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                    [str(BIN / "rae"), "params", "--preset", preset], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "bench"]):
            _run(cmd, proj, env)
        wall = _run(["dvc", "repro"], proj, env)
        services.stop_all(proj / ".prefect")
        return wall, stage_seconds(proj)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"rae run": [], "dvc repro": []}
    for _ in range(args.repeat):  # interleaved, so a change in the machine's load hits both
        runs["rae run"].append(rae_run(args.preset))
        runs["dvc repro"].append(dvc_repro(args.preset))
        print(json.dumps({k: [[round(x, 1) for x in pair] for pair in v]
                          for k, v in runs.items()}), flush=True)
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    work = {k: statistics.median(s for _, s in v) for k, v in runs.items()}
    load = os.getloadavg()[0]
    print("| preset | runs | `rae run` (stages' own) | `dvc repro` (stages' own) | ratio | load |")
    print(f"| {args.preset} | {args.repeat} | {wall['rae run']:.0f} s ({work['rae run']:.0f} s) | "
          f"{wall['dvc repro']:.0f} s ({work['dvc repro']:.0f} s) | "
          f"{wall['dvc repro'] / wall['rae run']:.2f} | {load:.1f} |")


if __name__ == "__main__":
    main()

"""Wall time of the demo pipeline and the share spent starting Prefect, Ray and MLflow.

Runs `rae run` (the active params.yaml, or --preset) in a fresh copy of the project so the
working tree is untouched, then reads the timings the pipeline logged to MLflow.

    .venv/bin/python bench/demo_timing.py [--preset tiny] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(preset: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proj = Path(tmp)
        shutil.copy(ROOT / "params.yaml", proj / "params.yaml")
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("PREFECT_HOME", None)
        cmd = [sys.executable, "-m", "flows.cli", "run"] + (["--preset", preset] if preset else [])
        t0 = time.time()
        res = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if res.returncode:
            raise SystemExit(res.stderr[-3000:])
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
        (parent,) = mlflow.search_runs(experiment_names=["rae"], output_format="list",
                                       filter_string="tags.`rae.kind` = 'pipeline'")
        m = parent.data.metrics
        ev = json.loads((proj / "runs" / "evaluate" / "metrics.json").read_text())
        stages = mlflow.search_runs(experiment_names=["rae"], output_format="list",
                                    filter_string=f"tags.`mlflow.parentRunId` = "
                                                  f"'{parent.info.run_id}'")
        stage_s = {r.data.tags.get("rae.stage", r.info.run_name):
                   round((r.info.end_time - r.info.start_time) / 1e3, 1) for r in stages}
        startup = m["pipeline.prefect_startup_s"] + m["pipeline.ray_startup_s"] + \
            m["pipeline.tracking_s"]
        return {"wall_s": wall, "prefect_startup_s": m["pipeline.prefect_startup_s"],
                "ray_startup_s": m["pipeline.ray_startup_s"],
                "mlflow_s": m["pipeline.tracking_s"], "startup_share": startup / wall,
                "fid": ev["fid"], "class_accuracy": ev.get("class_accuracy"),
                "recon_psnr": ev["recon_psnr"],
                "classifier_val_accuracy": ev.get("classifier_val_accuracy"), "stage_s": stage_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    runs = [one_run(args.preset) for _ in range(args.repeat)]
    for r in runs:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
    if len(runs) > 1:
        print("median wall_s", statistics.median(r["wall_s"] for r in runs))


if __name__ == "__main__":
    main()

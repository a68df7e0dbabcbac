"""Sampling throughput of trained projects, side by side on this machine.

In each project folder (one that `rae run --preset P` finished), the sample stage runs again
`--repeat` times, alternating between projects so load changes hit every one alike; its shards
are deleted first so every image is generated anew. The stage itself times its shards
(sampling and decoding, not loading): the median images/s per project and the ratio to the
first project are printed.

    .venv/bin/python bench/sampling_speed.py PROJECT:PRESET [PROJECT:PRESET ...] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def sample_once(project: Path, preset: str) -> dict:
    samples = project / "runs" / "samples"
    for shard in samples.glob("shard-*.npz"):
        shard.unlink()
    cmd = [sys.executable, "-m", "flows.cli", "stage", "sample", "--preset", preset]
    res = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{project}: sample failed\n{res.stderr[-3000:]}")
    return json.loads((samples / "throughput.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("projects", nargs="+", metavar="PROJECT:PRESET")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    pairs = [(Path(p).resolve(), preset) for p, _, preset in
             (item.rpartition(":") for item in args.projects)]
    speeds: dict[str, list[float]] = {preset: [] for _, preset in pairs}
    device = ""
    for _ in range(args.repeat):
        for project, preset in pairs:
            out = sample_once(project, preset)
            speeds[preset].append(out["images_per_s"])
            device = out["device"]
    first = statistics.median(speeds[pairs[0][1]])
    print(f"device: {device}; {args.repeat} runs each")
    print(f"{'preset':<12}{'median img/s':>14}{'min':>10}{'max':>10}{'x first':>10}")
    for preset, runs in speeds.items():
        med = statistics.median(runs)
        print(f"{preset:<12}{med:>14.2f}{min(runs):>10.2f}{max(runs):>10.2f}{med / first:>10.2f}")


if __name__ == "__main__":
    main()

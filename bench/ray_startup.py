"""What a training stage pays Ray before its loop runs: a TorchTrainer per stage against a Ray
task on a worker the run keeps warm (rae_core.train.runner.fit with ray.num_workers = 1).

Each launch runs a loop that imports torch and returns its start time; the figure is the time
from the launch to the loop's first line, median of --repeat launches after one warm-up.

    .venv/bin/python bench/ray_startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def loop(config: dict) -> float:
    import torch  # noqa: F401 - what a stage's loop imports first

    return time.time()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)

    def trainer() -> float:
        t0 = time.time()
        result = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                              run_config=RunConfig(storage_path=tempfile.mkdtemp())).fit()
        return result.return_value - t0

    task = ray.remote(num_cpus=1)(loop)

    def warm_task() -> float:
        t0 = time.time()
        return ray.get(task.remote({})) - t0

    for name, launch in (("TorchTrainer", trainer), ("Ray task", warm_task)):
        launch()  # warm-up: the first launch also starts a worker process
        times = [launch() for _ in range(args.repeat)]
        print(json.dumps({"launch": name, "to_loop_s_median": round(statistics.median(times), 2),
                          "to_loop_s": [round(t, 2) for t in times]}))


if __name__ == "__main__":
    main()

"""Launching work on Ray: training loops in a TorchTrainer, embarrassingly parallel shards as
Ray tasks. A local Ray sized to the machine starts on first use; RAY_ADDRESS joins a cluster."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rae_core.config import Config
from rae_core.errors import ConfigError

log = logging.getLogger(__name__)


def ensure_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False,
                 runtime_env={"env_vars": _worker_env()})
        have = ray.cluster_resources().get("CPU", 0)
        if have < need:
            raise ConfigError(f"ray.num_workers x ray.cpus_per_worker = {need} CPUs but the "
                              f"cluster at {os.environ['RAY_ADDRESS']} has {have:g}")
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # A local instance may oversubscribe: 2 workers x 2 threads on 2 cores is still correct.
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": _worker_env()})


def _worker_env() -> dict[str, str]:
    """Settings Ray workers must see before they import torch."""
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if os.environ.get("RAE_KILL_AT"):  # the crash drill must reach the workers it kills
        env["RAE_KILL_AT"] = os.environ["RAE_KILL_AT"]
    return env


def fit(name: str, loop: Callable[[dict], Any], loop_config: dict, cfg: Config,
        storage: Path, max_failures: int = 3) -> Any:
    """Run `loop` on cfg.ray.num_workers Ray Train workers; return rank 0's return value.

    The run name carries the stage's configuration fingerprint, so re-running the same
    configuration reuses the same storage and the loop resumes from its own checkpoint.
    A worker that dies is replaced up to `max_failures` times; the loop then resumes too.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(cfg)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.return_value


def map_shards(fn: Callable[..., Any], shard_args: list[tuple], cfg: Config) -> list[Any]:
    """fn(*args) for every shard as Ray tasks, one thread each; results in shard order."""
    import ray

    ensure_ray(cfg)
    remote = ray.remote(num_cpus=1, num_gpus=1 if cfg.ray.use_gpu else 0,
                        max_retries=2)(_single_thread(fn))
    return ray.get([remote.remote(*args) for args in shard_args])


def _single_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        import torch

        torch.set_num_threads(1)
        return fn(*args)

    run.__name__ = getattr(fn, "__name__", "shard")
    return run


def worker_setup(cfg: Config) -> tuple[int, int, Any]:
    """(rank, world size, device) inside a Ray Train worker, with torch threads pinned."""
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(cfg.ray.cpus_per_worker)
    if not _in_ray_train():
        return 0, 1, torch.device("cuda" if cfg.ray.use_gpu else "cpu")
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu")
    return ctx.get_world_rank(), ctx.get_world_size(), device


def _in_ray_train() -> bool:
    """Whether this process is a Ray Train worker (loops also run plainly, e.g. in tests)."""
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return True
    except Exception:  # noqa: BLE001 - outside a Train session the context raises
        return False

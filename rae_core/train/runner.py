"""Launching work on Ray: training loops in a TorchTrainer (one worker: a Ray task), embarrassingly
parallel shards as Ray tasks. A local Ray sized to the machine starts on first use; RAY_ADDRESS
joins a cluster."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rae_core.config import Config
from rae_core.errors import ConfigError, DataError
from rae_core.paths import Paths

log = logging.getLogger(__name__)


def ray_address() -> str:
    """The Ray a driver uses: the cluster RAY_ADDRESS names, or `local` (its own)."""
    return os.environ.get("RAY_ADDRESS") or "local"


def ensure_ray(cfg: Config) -> None:
    """Join the cluster RAY_ADDRESS names, or start a local Ray when it is unset or `local`.

    `local` is explicit so that a driver on a node that already runs a cluster never joins it
    by accident (and never passes num_cpus to a cluster it joined). A local Ray is the head
    that RAE_LOCAL_RAY names, shared by the project's stages, where one runs."""
    import ray

    if ray.is_initialized():
        shared = os.environ.get("RAE_LOCAL_RAY")
        joined = ray.get_runtime_context().gcs_address
        if not shared or shared.rsplit(":", 1)[1] == joined.rsplit(":", 1)[1]:
            return
        ray.shutdown()  # a long-lived driver whose project's head was replaced: join the new one
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    address = ray_address()
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if shared := os.environ.get("RAE_LOCAL_RAY"):  # the project's own head (flows.services)
            ray.init(address=shared, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": _worker_env()})
            return
        # A local instance may oversubscribe: 2 workers x 2 threads on 2 cores is still correct.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need),
                 include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": _worker_env()})
        return
    ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": _worker_env()})
    from ray.autoscaler.sdk import request_resources

    bundle = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})}
    wait_for_resources(bundle, cfg.ray.num_workers, ray.cluster_resources, request_resources,
                       cfg.ray.scale_up_timeout_s, address)


# the modules that the stages' Ray tasks run, imported ahead in the workers they will reuse
STAGE_MODULES = ("rae_core.stages", "rae_core.generate", "rae_core.train.pretrain_autoencoder",
                 "rae_core.train.decoder", "rae_core.train.generator")


def _import(modules: tuple[str, ...]) -> int:
    import importlib

    for name in modules:
        importlib.import_module(name)
    return os.getpid()


def warm_workers(cfg: Config, count: int = 2) -> list:
    """Start up to `count` worker processes of this driver on a local Ray, importing the stages'
    code, while the driver goes on: a stage's first task then reuses a ready worker instead of
    starting one and importing torch (~2-3 s). Two: train-decoder runs beside the other stages.
    A cluster's workers are left alone (they are on other nodes, with other resources).
    Returns the tasks' refs (their workers' pids), which nothing needs to wait for."""
    import ray

    if ray_address() != "local":
        return []
    free = int(ray.available_resources().get("CPU", 0) // cfg.ray.cpus_per_worker)
    task = ray.remote(num_cpus=cfg.ray.cpus_per_worker)(_import)
    return [task.remote(STAGE_MODULES) for _ in range(min(count, free))]


def wait_for_resources(bundle: dict[str, float], count: int, available: Callable[[], dict],
                       request: Callable[..., None], timeout_s: float, address: str,
                       poll_s: float = 10.0) -> None:
    """Wait until the cluster holds `count` x `bundle` in total, asking its autoscaler for them.

    A cluster that scales its GPU nodes to zero starts with none; `request` (the autoscaler's
    request_resources) makes it launch them at once. The request is withdrawn once they are
    there: the trainer's own placement group keeps them busy, and idle nodes may go again."""
    need = {k: v * count for k, v in bundle.items()}

    def short() -> dict[str, float]:
        have = available()
        return {k: have.get(k, 0.0) for k, v in need.items() if have.get(k, 0.0) < v}

    missing = short()
    if not missing:
        return
    if timeout_s > 0:
        request(bundles=[bundle] * count)
        log.info("waiting up to %.0f s for the cluster to scale up to %s", timeout_s, need)
        deadline = time.monotonic() + timeout_s
        while missing and time.monotonic() < deadline:
            time.sleep(poll_s)
            missing = short()
        request(bundles=[])
        if not missing:
            return
    what = ", ".join(f"{need[k]:g} {k} (it has {v:g})" for k, v in missing.items())
    raise ConfigError(f"ray.num_workers x ray.cpus_per_worker: the run needs {what} on the "
                      f"cluster at {address}; waited {timeout_s:g} s (ray.scale_up_timeout_s)")


def _worker_env() -> dict[str, str]:
    """Settings Ray workers must see before they import torch."""
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if os.environ.get("RAE_KILL_AT"):  # the crash drill must reach the workers it kills
        env["RAE_KILL_AT"] = os.environ["RAE_KILL_AT"]
    return env


def fit(name: str, loop: Callable[[dict], Any], loop_config: dict, cfg: Config,
        storage: Path, max_failures: int = 3) -> Any:
    """Run `loop` on cfg.ray.num_workers Ray workers; return rank 0's return value.

    Several workers train data-parallel in a TorchTrainer. One worker has no gradients to
    average: its loop runs as a Ray task on a worker process that the run's earlier stages left
    warm, which saves the ~10 s a TorchTrainer spends starting its controller and worker group
    (docs/benchmarks.md). Either way a worker that dies is replaced up to `max_failures` times
    and the loop resumes from its own checkpoint. The run name carries the stage's
    configuration fingerprint, so re-running the same configuration reuses the same storage.
    """
    ensure_ray(cfg)
    stage = name.rsplit("-", 1)[0]  # run names are <stage>-<fingerprint>
    loop = logging_to(Paths.at(loop_config["root"]).metrics_log(stage), loop)
    if cfg.ray.num_workers == 1:
        import ray

        task = ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0,
                          max_retries=max_failures, retry_exceptions=False)(loop)
        return ray.get(task.options(name=name).remote(loop_config))
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.return_value


def dataset_view(root: str) -> dict:
    """What a node sees at a dataset path: where it leads and how many class folders per split."""
    import socket

    def classes(split: str) -> int:
        d = Path(root) / split
        return sum(1 for c in d.iterdir() if c.is_dir()) if d.is_dir() else -1

    return {"node": socket.gethostname(), "target": os.path.realpath(root),
            "train": classes("train"), "val": classes("val")}


def compare_dataset_views(driver: dict, worker: dict, setting: str) -> None:
    """The worker must see what the driver validated: a link into storage only the driver's
    node has (a local disk, a home folder) would resolve there and nowhere else."""
    keys = ("target", "train", "val")
    if all(driver[k] == worker[k] for k in keys):
        return
    raise DataError(f"{setting}: Ray worker node {worker['node']} sees {worker['target']} "
                    f"({worker['train']} train / {worker['val']} val classes) where the driver "
                    f"sees {driver['target']} ({driver['train']} / {driver['val']}); put the "
                    "dataset on the volume every node mounts at the same path (/mnt/shared, "
                    "infra/README.md)")


def check_dataset_on_workers(root: Path, setting: str, cfg: Config) -> None:
    """On a cluster, a worker node (one with a GPU, when the run uses them) reads the dataset
    at `root` as the driver does. Nothing to check with a local Ray: one machine, one view."""
    if ray_address() == "local":
        return
    import ray

    ensure_ray(cfg)
    probe = ray.remote(num_cpus=1, num_gpus=1 if cfg.ray.use_gpu else 0,
                       max_retries=2)(dataset_view)
    compare_dataset_views(dataset_view(str(root)), ray.get(probe.remote(str(root))), setting)


def map_shards(fn: Callable[..., Any], shard_args: list[tuple], cfg: Config,
               desc: str | None = None) -> list[Any]:
    """fn(*args) for every shard as Ray tasks, one thread each (and a GPU each when
    ray.use_gpu: fn computes on device.of(cfg)); results in shard order. A progress bar
    (`desc`, default: fn's name) counts the shards as they finish."""
    import ray
    from tqdm import tqdm

    ensure_ray(cfg)
    remote = ray.remote(num_cpus=1, num_gpus=1 if cfg.ray.use_gpu else 0,
                        max_retries=2)(_single_thread(fn))
    refs = [remote.remote(*args) for args in shard_args]
    pending = refs
    with tqdm(total=len(refs), desc=desc or fn.__name__.strip("_"), unit="shard",
              disable=None, leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending)
            bar.update(len(ray.get(done)))  # get: a failed shard raises now, not at the end
    return ray.get(refs)


def run_on_worker(fn: Callable[..., Any], *args: Any, cfg: Config,
                  log_to: Path | None = None) -> Any:
    """fn(*args) as one Ray task on a worker of the run, not in the driver: with a GPU when
    ray.use_gpu (fn computes on device.of(cfg)), else ray.cpus_per_worker CPUs and as many torch
    threads, as a single-worker training loop gets. With `log_to`, the worker's rae_core logs
    go to that stage log, which the driver forwards."""
    import ray

    ensure_ray(cfg)
    if log_to:
        log_to.parent.mkdir(parents=True, exist_ok=True)
    threads = cfg.ray.cpus_per_worker

    def call(given: tuple) -> Any:
        import torch

        torch.set_num_threads(threads)
        return fn(*given)

    call.__name__ = getattr(fn, "__name__", "task")
    task = ray.remote(num_cpus=threads, num_gpus=1 if cfg.ray.use_gpu else 0,
                      max_retries=2)(logging_to(log_to, call) if log_to else call)
    return ray.get(task.remote(args))


def _single_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        import torch

        torch.set_num_threads(1)
        return fn(*args)

    run.__name__ = getattr(fn, "__name__", "shard")
    return run


class StageLogHandler(logging.Handler):
    """A worker's log records as JSON lines in its stage's log, which the driver tails
    (flows/tracking.py) into the Prefect run's logs: Ray keeps the output of workers from the
    driver (log_to_driver=False)."""

    def __init__(self, path: Path, rank: int):
        super().__init__(logging.INFO)
        self.path, self.rank = Path(path), rank

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = json.dumps({"time": record.created, "log": {
                "level": record.levelname, "logger": record.name, "rank": self.rank,
                "message": self.format(record)}})
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except Exception:  # noqa: BLE001 - logging must never break the loop
            self.handleError(record)


def logging_to(path: Path, loop: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """`loop` with the worker's rae_core logs (INFO and up) appended to the stage log `path`."""
    def run(config: dict) -> Any:
        import ray.train

        rank = ray.train.get_context().get_world_rank() if _in_ray_train() else 0
        logger, handler = logging.getLogger("rae_core"), StageLogHandler(path, rank)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        log.info("%s: worker %d up", run.__name__, rank)  # marks the end of Ray's start-up
        try:
            return loop(config)
        finally:
            logger.removeHandler(handler)

    run.__name__ = getattr(loop, "__name__", "loop")
    return run


def worker_setup(cfg: Config) -> tuple[int, int, Any]:
    """(rank, world size, device) inside a Ray Train worker, with torch threads pinned."""
    import ray.train
    import ray.train.torch
    import torch

    from rae_core import device

    torch.set_num_threads(cfg.ray.cpus_per_worker)
    if not _in_ray_train():
        return 0, 1, device.of(cfg)
    ctx = ray.train.get_context()
    here = ray.train.torch.get_device() if cfg.ray.use_gpu else device.of(cfg)
    return ctx.get_world_rank(), ctx.get_world_size(), here


def _in_ray_train() -> bool:
    """Whether this process is a Ray Train worker (loops also run plainly, e.g. in tests)."""
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return True
    except Exception:  # noqa: BLE001 - outside a Train session the context raises
        return False

"""MLflow tracking: one parent run per pipeline run, one child run per stage, metrics forwarded
from the stage's JSON-lines log while it runs, artifacts, registered models, the leaderboard."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from flows import stores
from flows.source import source_tags
from rae_core.config import Config

log = logging.getLogger(__name__)

EVAL_KIND = "evaluation"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, tokens);
# with it, on the runs table of model training
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
SECRET_WORDS = ("token", "password", "secret", "key_id", "access_key", "credential")
URL_CREDENTIALS = re.compile(r"://[^/@\s]+@")


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def experiment_id(cfg: Config, root: Path) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("sqlite:///"):
        stores.seed("mlflow", Path(uri.removeprefix("sqlite:///")))
    import mlflow

    name = cfg.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND) is None:  # made before the tag, or by someone else
            client().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return exp.experiment_id
    # artifacts beside the SQLite store they belong to (a run's own folder may be temporary)
    store = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else root
    location = (store / "mlartifacts" / name).as_uri() if uri.startswith("sqlite") else None
    return mlflow.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND: MODEL_TRAINING})


def _safe_params(cfg: Config) -> dict[str, str]:
    """Flattened params; values of keys that look like credentials, and the user:password part
    of URLs (an s3:// or https:// data.source), are never logged."""
    out = {}
    for k, v in cfg.flat().items():
        out[k] = "***" if any(w in k.lower() for w in SECRET_WORDS) else \
            URL_CREDENTIALS.sub("://***@", str(v))[:5000]
    return out


def start_run(cfg: Config, root: Path, name: str, parent: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    from mlflow.entities import Param

    c = client()
    all_tags = {"mlflow.runName": name, "rae.preset": cfg.preset, **source_tags(root),
                **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = c.create_run(experiment_id(cfg, root), tags=all_tags)
    params = [Param(k, v) for k, v in _safe_params(cfg).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i: i + 100])
    log_dataset(run.info.run_id, cfg, Path(root))
    return run.info.run_id


def dataset_digest(cfg: Config, root: Path) -> str:
    """The dataset's digest: DVC's md5 of the prepared folder where dvc.lock has one, else the
    signature `prepare` recorded of it; '' before the dataset is prepared."""
    import yaml

    from rae_core import provenance
    from rae_core.paths import Paths
    from rae_core.store import read_record

    lock = root / "dvc.lock"
    if lock.exists():
        outs = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(
            "prepare", {}).get("outs", [])
        for out in outs:
            if out.get("path") == cfg.data.root and out.get("md5"):
                return out["md5"]
    rec = read_record(provenance.record_path(Paths.at(root), "prepare"))
    return rec["signature"] if rec else ""


def log_dataset(run_id: str, cfg: Config, root: Path) -> None:
    """The data a run reads as an MLflow dataset input (the runs table's Dataset column)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    digest = dataset_digest(cfg, root)
    if not digest:
        return
    path = root / cfg.data.root
    name = cfg.data.dataset if cfg.data.dataset != "folder" else Path(cfg.data.source).name
    with warnings.catch_warnings():  # a local folder resolves to MLflow's one local source
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        source = resolve_dataset_source(str(path.resolve()))
    ds = MetaDataset(source, name=name, digest=digest)
    client().log_inputs(run_id, datasets=[DatasetInput(
        ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


def stage_run(cfg: Config, root: Path, name: str, parent: str | None,
              tags: dict[str, str] | None = None, resuming: bool = False) -> str:
    """The MLflow run of a stage. When the stage is `resuming` from a checkpoint, the run that
    an earlier attempt of the same stage, configuration and project left unfinished (killed
    or failed), so that its curves continue in one run; otherwise a new one. A stage run again
    after it finished, or from scratch, gets a new run."""
    import hashlib

    key = hashlib.sha256(f"{name}|{cfg.fingerprint()}|{Path(root).resolve()}".encode()
                         ).hexdigest()[:16]
    c = client()
    earlier = c.search_runs([experiment_id(cfg, root)],
                            f"tags.`rae.resume_key` = '{key}' and "
                            "attributes.status != 'FINISHED'",
                            max_results=1, order_by=["attributes.start_time DESC"]
                            ) if resuming else []
    if not earlier:
        return start_run(cfg, root, name, parent, tags={**(tags or {}), "rae.resume_key": key})
    run_id = earlier[0].info.run_id
    c.update_run(run_id, status="RUNNING")
    if parent:
        c.set_tag(run_id, "mlflow.parentRunId", parent)  # under the pipeline run resuming it
    c.set_tag(run_id, "rae.resumed", "true")
    log.info("%s: continuing MLflow run %s of the unfinished attempt", name, run_id)
    return run_id


def end_run(run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    c = client()
    if error:
        c.set_tag(run_id, "rae.error", error[:5000])
    c.set_terminated(run_id, status)


def log_numbers(run_id: str, values: dict[str, Any], prefix: str = "", step: int = 0) -> None:
    """Numeric values as metrics, strings as tags."""
    from mlflow.entities import Metric

    c, now = client(), int(time.time() * 1000)
    metrics = []
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            c.set_tag(run_id, f"{prefix}{k}", str(v)[:5000])
        else:
            metrics.append(Metric(f"{prefix}{k}", float(v), now, step))
    if metrics:
        c.log_batch(run_id, metrics=metrics)


@contextlib.contextmanager
def system_metrics(run_id: str, interval_s: float = 10.0):
    """CPU, memory, disk and network of this machine (and its GPUs, where MLflow can read them)
    as the run's `system/...` curves while the block runs: the driver's machine, which is also
    the workers' on one machine."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


class MetricsForwarder:
    """Tails a stage's JSON-lines log into its MLflow run, live, from a background thread; the
    log lines of its Ray workers are logged again here, where the Prefect run's logs get them,
    and a training stage's steps (of `steps` configured) move a progress bar."""

    def __init__(self, run_id: str, path: Path, interval: float = 2.0, steps: int | None = None):
        self.run_id, self.path, self.interval, self.steps = run_id, path, interval, steps
        self.offset = 0
        self.first_time: float | None = None
        self.opened = time.time()
        self._bar = None
        self._stop = threading.Event()
        # in the caller's context: the Prefect task run that the worker lines belong to
        self._thread = threading.Thread(target=contextvars.copy_context().run,
                                        args=(self._loop,), daemon=True)

    def __enter__(self) -> MetricsForwarder:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()
        if self._bar is not None:
            self._bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a tracking hiccup must not kill training
                log.warning("metrics forwarding failed; will retry", exc_info=True)

    def flush(self) -> None:
        from mlflow.entities import Metric

        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            lines = f.readlines()
        complete = [ln for ln in lines if ln.endswith("\n")]
        self.offset += sum(len(ln) for ln in complete)
        metrics = []
        for ln in complete:
            rec = json.loads(ln)
            if self.first_time is None and rec["time"] >= self.opened:
                self.first_time = rec["time"]  # the stage's code runs: start-up is over
            if "log" in rec:
                r = rec["log"]
                logging.getLogger(r["logger"]).log(logging.getLevelName(r["level"]),
                                                   "[rank %d] %s", r["rank"], r["message"])
                continue
            if "metrics" in rec:
                ts = int(rec["time"] * 1000)
                metrics += [Metric(k, v, ts, rec["step"]) for k, v in rec["metrics"].items()]
                self._advance(rec["step"])
            elif "artifact" in rec:
                client().log_artifact(self.run_id, rec["artifact"], artifact_path="images")
            elif "event" in rec:
                client().set_tag(self.run_id, "rae.event", rec["event"])
        for i in range(0, len(metrics), 1000):
            client().log_batch(self.run_id, metrics=metrics[i: i + 1000])

    def _advance(self, step: int) -> None:
        if self.steps is None:
            return
        if self._bar is None:
            from flows.console import progress

            self._bar = progress(self.steps, self.path.stem, unit="step")
        self._bar.update(max(0, step - self._bar.n))


def register(run_id: str, model, name: str, tags: dict[str, str]) -> str:
    """Log a model to the run and register it; returns the new version. `model` is a torch
    module (logged by mlflow.pytorch) or a function that logs one to the active run and
    registers it under the name it is given, returning MLflow's ModelInfo."""
    from importlib.metadata import version as installed

    import mlflow
    import mlflow.pytorch
    from torch import nn

    # given, not inferred: inference imports the model in a subprocess (~4 s per registration)
    requirements = [f"{p}=={installed(p).split('+')[0]}"
                    for p in ("torch", "cloudpickle", "rae-platform")]
    with mlflow.start_run(run_id=run_id):  # the logged model is the run's output
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                        registered_model_name=name,
                                        pip_requirements=requirements) \
            if isinstance(model, nn.Module) else model(name)
    version = str(info.registered_model_version)
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    return version

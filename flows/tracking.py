"""MLflow tracking: one parent run per pipeline run, one child run per stage, metrics forwarded
from the stage's JSON-lines log while it runs, artifacts, registered models, the leaderboard.

Every call a stage makes goes through `call`: transient errors (the server unreachable,
restarting, overloaded) are retried with backoff for up to RAE_TRACKING_RETRY_S seconds; past
that, the call is kept in the run's journal (flows/journal.py), the stage goes on, and
`rae sync` logs it later. Once the budget is spent, later calls try once until one succeeds, so
a server that stays down does not stall every stage.
"""

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
from flows.journal import Journal, is_offline, offline_id
from flows.source import source_tags
from rae_core.config import Config

log = logging.getLogger(__name__)

EVAL_KIND = "evaluation"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, tokens);
# with it, on the runs table of model training
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
SECRET_WORDS = ("token", "password", "secret", "key_id", "access_key", "credential")
URL_CREDENTIALS = re.compile(r"://[^/@\s]+@")
TRANSIENT_STATUS = (429, 502, 503, 504)
_down = threading.Event()  # set once a call spent its retry budget, until one succeeds
_lock = threading.Lock()
_roots: dict[str, Path] = {}  # run id -> project, for the run's journal
_journals: dict[str, Journal] = {}  # runs of this process with calls kept for `rae sync`


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def experiment_id(cfg: Config, root: Path) -> str:
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        stores.seed("mlflow", Path(uri.removeprefix("sqlite:///")))
    return retrying(_experiment, cfg.tracking.experiment, _artifact_location(cfg, root))


def _artifact_location(cfg: Config, root: Path) -> str | None:
    uri = tracking_uri()
    # artifacts beside the SQLite store they belong to (a run's own folder may be temporary)
    store = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else root
    return (store / "mlartifacts" / cfg.tracking.experiment).as_uri() \
        if uri.startswith("sqlite") else None


def _experiment(name: str, location: str | None) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND) is None:  # made before the tag, or by someone else
            client().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return exp.experiment_id
    return mlflow.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND: MODEL_TRAINING})


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "")


def retry_budget() -> float:
    return float(os.environ.get("RAE_TRACKING_RETRY_S", "60"))


def transient(e: BaseException) -> bool:
    """Whether a tracking error may pass: a refused or dropped connection, a timeout, or a
    server answering that it is overloaded or restarting. MLflow wraps the cause in its own
    exception, keeping it as the context."""
    import requests

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, requests.ConnectionError | requests.Timeout | ConnectionError |
                      TimeoutError):
            return True
        status = getattr(seen, "get_http_status_code", None)
        if callable(status) and status() in TRANSIENT_STATUS:
            return True
        if str(seen).startswith("API request to") and " failed with " in str(seen):
            return True  # the wrapped cause is gone where MLflow formatted it into the text
        seen = seen.__cause__ or seen.__context__
    return False


def retrying(fn, *args, budget_s: float | None = None, **kwargs):
    """fn(*args, **kwargs), again after each transient error, waiting 0.5 s, then twice as long
    each time (at most 8 s), until `budget_s` (RAE_TRACKING_RETRY_S) seconds would pass; one
    try only while the server is known to be down. Other errors, and the last transient one
    once the budget is spent, are raised."""
    budget = 0.0 if _down.is_set() else (retry_budget() if budget_s is None else budget_s)
    deadline, delay = time.monotonic() + budget, 0.5
    while True:
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            if not transient(e):
                raise
            if time.monotonic() + delay > deadline:
                _down.set()
                raise
            log.info("tracking server did not answer (%s); trying again in %.1f s",
                     str(e).splitlines()[0][:200], delay)
            time.sleep(delay)
            delay = min(2 * delay, 8.0)
            continue
        _down.clear()
        return out


def call(run_id: str, op: str, **args) -> Any:
    """`OPS[op](run_id, **args)` with retries. Past the retry budget, or once an earlier call of
    the run is pending (the run's calls keep their order), it is kept in the run's journal
    instead and None is returned; errors that are not transient are raised."""
    pending = _journals.get(run_id)
    if pending is None or not pending.ops:
        try:
            return retrying(OPS[op], run_id, **args)
        except Exception as e:
            if not transient(e):
                raise
            log.warning("tracking server %s did not answer; %s of run %s is kept for "
                        "`rae sync`", tracking_uri(), op, run_id)
    journal(run_id).append(op, args)
    return None


def journal(run_id: str) -> Journal:
    with _lock:
        if run_id not in _journals:
            root = _roots.get(run_id, Path.cwd())
            _journals[run_id] = Journal.open(root, run_id, _names.get(run_id, run_id),
                                             tracking_uri())
        return _journals[run_id]


def offline(run_id: str) -> bool:
    """Whether the run's calls go to its journal for now (its server did not answer)."""
    j = _journals.get(run_id)
    return is_offline(run_id) or bool(j and j.ops)


def op(name: str):
    """Register a function(run_id, **args) as the tracking operation `name`, which `call` runs
    and `rae sync` replays (the model registration is registered by flows/pipeline.py)."""
    def add(fn):
        OPS[name] = fn
        return fn
    return add


def _safe_params(cfg: Config) -> dict[str, str]:
    """Flattened params; values of keys that look like credentials, and the user:password part
    of URLs (an s3:// or https:// data.source), are never logged."""
    out = {}
    for k, v in cfg.flat().items():
        out[k] = "***" if any(w in k.lower() for w in SECRET_WORDS) else \
            URL_CREDENTIALS.sub("://***@", str(v))[:5000]
    return out


_names: dict[str, str] = {}  # run id -> run name, for the line about what was not logged


def start_run(cfg: Config, root: Path, name: str, parent: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    """A new run with the configuration as params. When the server does not answer, a local
    id (offline-...) under which the run's calls are journaled until `rae sync` creates it."""
    all_tags = {"mlflow.runName": name, "rae.preset": cfg.preset, **source_tags(root),
                **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    root = Path(root)
    args = {"experiment": cfg.tracking.experiment, "location": _artifact_location(cfg, root),
            "tags": all_tags, "params": _safe_params(cfg), "dataset": _dataset(cfg, root)}
    run_id = None
    if not is_offline(parent):
        try:
            run_id = retrying(_create, None, **args)
        except Exception as e:
            if not transient(e):
                raise
    if run_id is None:
        run_id = offline_id()
        log.warning("tracking server %s did not answer; run %s (%s) is kept for `rae sync`",
                    tracking_uri(), run_id, name)
    _roots[run_id], _names[run_id] = root, name
    if is_offline(run_id):
        journal(run_id).append("create", args)
    return run_id


def _create(run_id: str | None, experiment: str, location: str | None, tags: dict,
            params: dict, dataset: dict | None) -> str:
    """Create the run (`run_id`: the offline id it replaces, tagged so that a sync cut short
    finds the run it made instead of making a second one)."""
    from mlflow.entities import Param

    c, exp = client(), _experiment(experiment, location)
    if run_id:
        made = c.search_runs([exp], f"tags.`rae.offline_id` = '{run_id}'", max_results=1)
        if made:
            return made[0].info.run_id
        tags = {**tags, "rae.offline_id": run_id}
    run = c.create_run(exp, tags=tags)
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i: i + 100])
    if dataset:
        _log_dataset(run.info.run_id, **dataset)
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


def _dataset(cfg: Config, root: Path) -> dict | None:
    """What the run's dataset input records: the data's folder, name and digest; None before
    the dataset is prepared."""
    digest = dataset_digest(cfg, root)
    if not digest:
        return None
    name = cfg.data.dataset if cfg.data.dataset != "folder" else Path(cfg.data.source).name
    return {"path": str((root / cfg.data.root).resolve()), "name": name, "digest": digest}


def _log_dataset(run_id: str, path: str, name: str, digest: str) -> None:
    """The data a run reads as an MLflow dataset input (the runs table's Dataset column)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # a local folder resolves to MLflow's one local source
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        source = resolve_dataset_source(path)
    ds = MetaDataset(source, name=name, digest=digest)
    client().log_inputs(run_id, datasets=[DatasetInput(
        ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


def _key(*parts: str) -> str:
    import hashlib

    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _unfinished(cfg: Config, root: Path, tag: str, key: str) -> str | None:
    """The newest run of the experiment whose `tag` is `key` and that did not finish (killed,
    failed, or still open), or None; None too when the server is down (a new run, journaled)."""
    try:
        runs = retrying(client().search_runs, [experiment_id(cfg, root)],
                        f"tags.`{tag}` = '{key}' and attributes.status != 'FINISHED'",
                        max_results=1, order_by=["attributes.start_time DESC"])
    except Exception as e:
        if not transient(e):
            raise
        return None
    return runs[0].info.run_id if runs else None


def stage_run(cfg: Config, root: Path, name: str, parent: str | None,
              tags: dict[str, str] | None = None, resuming: bool = False) -> str:
    """The MLflow run of a stage. When the stage is `resuming` from a checkpoint, the run that
    an earlier attempt of the same stage, configuration and project left unfinished (killed
    or failed), so that its curves continue in one run; otherwise a new one. A stage run again
    after it finished, or from scratch, gets a new run."""
    key = _key(name, cfg.fingerprint(), str(Path(root).resolve()))
    tags = {**(tags or {}), "rae.resume_key": key}
    run_id = _unfinished(cfg, root, "rae.resume_key", key) \
        if resuming and not is_offline(parent) else None
    if run_id is None:
        return start_run(cfg, root, name, parent, tags=tags)
    _roots[run_id], _names[run_id] = Path(root), name
    call(run_id, "resume", parent=parent)
    log.info("%s: continuing MLflow run %s of the unfinished attempt", name, run_id)
    return run_id


def dvc_runner() -> str | None:
    """What runs this stage when DVC does (it sets DVC_STAGE for every stage command): `dvc
    exp run NAME`, or `dvc repro`; None outside DVC."""
    if not os.environ.get("DVC_STAGE"):
        return None
    name = os.environ.get("DVC_EXP_NAME")
    return f"dvc exp run {name}" if name else "dvc repro"


def dvc_pipeline_run(cfg: Config, root: Path, tags: dict[str, str]) -> str:
    """The pipeline run that groups the stages DVC runs as separate commands, as `rae run`'s
    parent run groups its own: the one that this configuration's earlier stages in this
    project (and experiment) left open, or a new one. The last stage ends it."""
    runner = dvc_runner() or "dvc repro"
    key = _key("pipeline", cfg.fingerprint(), str(Path(root).resolve()), runner)
    run_id = _unfinished(cfg, root, "rae.pipeline_key", key)
    if run_id is None:
        return start_run(cfg, root, f"pipeline-{cfg.preset}",
                         tags={**tags, "rae.kind": "pipeline", "rae.runner": runner,
                               "rae.pipeline_key": key})
    _roots[run_id], _names[run_id] = Path(root), f"pipeline-{cfg.preset}"
    call(run_id, "resume", parent=None, joined=True)
    return run_id


def _resume(run_id: str, parent: str | None, joined: bool = False) -> None:
    """Open the run again; `joined`: by a next stage of its pipeline, which is no resumption."""
    c = client()
    c.update_run(run_id, status="RUNNING")
    if parent:
        c.set_tag(run_id, "mlflow.parentRunId", parent)  # under the pipeline run resuming it
    if not joined:
        c.set_tag(run_id, "rae.resumed", "true")


def end_run(run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    """The run's status, after its last call: then the calls a short outage kept are tried
    once more, so that a server back by now gets them without `rae sync`."""
    call(run_id, "end", status=status, error=error)
    if offline(run_id) and not _down.is_set():
        with contextlib.suppress(Exception):  # still down: the journal waits for `rae sync`
            replay(journal(run_id))


def _end(run_id: str, status: str, error: str | None) -> None:
    c = client()
    if error:
        c.set_tag(run_id, "rae.error", error[:5000])
    c.set_terminated(run_id, status)


def log_numbers(run_id: str, values: dict[str, Any], prefix: str = "", step: int = 0) -> None:
    """Numeric values as metrics, strings as tags."""
    now, metrics, tags = int(time.time() * 1000), [], {}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            tags[f"{prefix}{k}"] = str(v)[:5000]
        else:
            metrics.append([f"{prefix}{k}", float(v), now, step])
    if metrics or tags:
        call(run_id, "log", metrics=metrics, tags=tags)


def _log(run_id: str, metrics: list[list], tags: dict[str, str]) -> None:
    from mlflow.entities import Metric, RunTag

    for i in range(0, max(len(metrics), 1), 1000):
        client().log_batch(run_id, metrics=[Metric(*m) for m in metrics[i: i + 1000]],
                           tags=[RunTag(k, v) for k, v in tags.items()] if i == 0 else [])


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    call(run_id, "tags", tags=tags)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    call(run_id, "artifact", path=str(path), artifact_path=artifact_path)


def _artifact(run_id: str, path: str, artifact_path: str | None) -> None:
    client().log_artifact(run_id, path, artifact_path=artifact_path)


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
    and a training stage's steps (of `steps` configured) move a progress bar.

    `offset` only moves past lines that reached the run: while the server is down they are sent
    again on each tick, and at the end, past the retry budget, copied into the run's journal."""

    def __init__(self, run_id: str, path: Path, interval: float = 2.0, steps: int | None = None):
        self.run_id, self.path, self.interval, self.steps = run_id, path, interval, steps
        self.offset = 0  # sent to MLflow up to here
        self.seen = 0  # read (worker logs re-logged, bar moved) up to here
        self.first_time: float | None = None
        self.opened = time.time()
        self._bar = None
        self._failing = False
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
        try:
            retrying(self.flush)
        except Exception as e:
            if not transient(e):
                raise
            self._keep_rest()
        if self._bar is not None:
            self._bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - a tracking hiccup must not kill training
                if not transient(e):
                    log.warning("metrics forwarding failed; will retry", exc_info=True)
                elif not self._failing:
                    log.warning("tracking server %s did not answer; %s's metrics are kept and "
                                "sent once it does", tracking_uri(), self.path.stem)
                self._failing = True
                continue
            if self._failing:
                log.info("tracking server answers again; %s's metrics are sent", self.path.stem)
                self._failing = False

    def _lines(self) -> list[tuple[int, str]]:
        """The complete lines from `offset`, each with the offset of its end."""
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            lines = f.readlines()
        out, end = [], self.offset
        for ln in lines:
            if ln.endswith("\n"):
                end += len(ln.encode())
                out.append((end, ln))
        return out

    def flush(self) -> None:
        """Send the lines not yet sent; worker log lines are re-logged only the first time."""
        if offline(self.run_id):
            self._read(self._lines())
            return
        batch: list[list] = []
        for end, ln in self._lines():
            rec = json.loads(ln)
            if end > self.seen:
                self._note(rec)
            if "metrics" in rec:
                ts = int(rec["time"] * 1000)
                batch += [[k, v, ts, rec["step"]] for k, v in rec["metrics"].items()]
            elif "artifact" in rec or "event" in rec:
                self._send(batch)  # in order: the metrics before it first
                batch = []
                replay_line(self.run_id, rec)
            if "metrics" not in rec or len(batch) >= 1000:
                self._send(batch)
                batch, self.offset = [], end
            self.seen = max(self.seen, end)
        self._send(batch)
        self.offset = self.seen

    def _read(self, lines: list[tuple[int, str]]) -> None:
        for end, ln in lines:
            if end > self.seen:
                self._note(json.loads(ln))
                self.seen = end

    def _send(self, batch: list[list]) -> None:
        if batch:
            _log(self.run_id, batch, {})

    def _note(self, rec: dict) -> None:
        """What a line means here, once: start-up over, a worker's log line, a step done."""
        if self.first_time is None and rec["time"] >= self.opened:
            self.first_time = rec["time"]  # the stage's code runs: start-up is over
        if "log" in rec:
            r = rec["log"]
            logging.getLogger(r["logger"]).log(logging.getLevelName(r["level"]),
                                               "[rank %d] %s", r["rank"], r["message"])
        elif "metrics" in rec:
            self._advance(rec["step"])

    def _keep_rest(self) -> None:
        """The lines not sent go into the run's journal (worker log lines are not kept)."""
        self._read(lines := self._lines())
        kept = [ln for _, ln in lines if "log" not in json.loads(ln)]
        if kept:
            journal(self.run_id).append_lines(kept)
        self.offset = self.seen

    def _advance(self, step: int) -> None:
        if self.steps is None:
            return
        if self._bar is None:
            from flows.console import progress

            self._bar = progress(self.steps, self.path.stem, unit="step")
        self._bar.update(max(0, step - self._bar.n))


def replay_line(run_id: str, rec: dict) -> None:
    """An artifact or event line of a stage's log, logged to its run."""
    if "artifact" in rec:
        client().log_artifact(run_id, rec["artifact"], artifact_path="images")
    elif "event" in rec:
        client().set_tag(run_id, "rae.event", rec["event"])


def register(run_id: str, model, name: str, tags: dict[str, str]) -> str:
    """Log a model to the run and register it; returns the new version. `model` is a torch
    module (logged by mlflow.pytorch) or a function that logs one to the active run and
    registers it under the name it is given, returning MLflow's ModelInfo."""
    from importlib.metadata import version as installed

    import mlflow
    import mlflow.pytorch
    from torch import nn

    found = client().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:  # registered already, by an attempt whose answer was lost
        return str(found[0].version)
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


OPS = {"create": _create, "resume": _resume, "log": _log,
       "tags": lambda run_id, tags: _log(run_id, [], tags), "artifact": _artifact, "end": _end}


def replay(j: Journal) -> list[str]:
    """Log a journal's calls into its run, in order, each leaving the journal once it reached
    the run (a second replay logs nothing twice); returns what was logged."""
    from flows.journal import resolve

    done = []
    for entry in list(j.ops):
        args = resolve(j.root, entry["args"])
        if entry["op"] == "create":
            j.created(retrying(_create, j.run, **args))
            done.append(f"created run {j.run}")
        elif entry["op"] == "lines":
            records = j.lines(args["offset"])
            _replay_lines(j.run, records)
            done.append(f"{len(records)} metric lines")
        else:
            retrying(OPS[entry["op"]], j.run, **args)
            done.append(entry["op"])
        j.done(entry)
    return done


def _replay_lines(run_id: str, records: list[dict]) -> None:
    metrics = [[k, v, int(r["time"] * 1000), r["step"]] for r in records if "metrics" in r
               for k, v in r["metrics"].items()]
    retrying(_log, run_id, metrics, {})  # MLflow keeps a metric logged twice once
    for rec in records:
        if "metrics" not in rec:
            retrying(replay_line, run_id, rec)


def unlogged_line() -> str | None:
    """One line on what this process's runs could not log, and the command that logs it."""
    waiting = [j for j in _journals.values() if j.ops]
    if not waiting:
        return None
    return (f"tracking server {tracking_uri()} did not answer; not logged: "
            + "; ".join(j.summary() for j in waiting)
            + "; `rae sync` logs it once the server answers")


def sync(root: Path) -> list[str]:
    """`rae sync`: replay every journal of the project into its run; one line per run."""
    from flows import pipeline  # noqa: F401 - registers the model registration operation
    from flows.journal import Journal

    lines = []
    for j in Journal.all(root):
        if j.data["uri"] != tracking_uri():
            lines.append(f"{j.path}: kept for MLFLOW_TRACKING_URI={j.data['uri']}, not "
                         f"{tracking_uri()}; run `rae sync` with that URI")
            continue
        summary = j.summary()
        replay(j)
        lines.append(f"logged {summary}" + (f" into run {j.run}" if j.run not in summary
                                            else ""))
    return lines or ["nothing to log: every run is complete in MLflow"]

"""Prefect flows: the whole pipeline (one task per stage) and single stages.

Each task is a thin wrapper: it opens the stage's MLflow child run, forwards the stage's metrics
while it runs, calls the rae_core stage, then logs its outputs, artifacts and models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from flows import console, tracking
from flows.source import flow_run_name
from rae_core import provenance
from rae_core.config import Config, from_dict
from rae_core.errors import ConfigError, RaeError
from rae_core.locking import project_lock
from rae_core.paths import Paths
from rae_core.stages import STAGES

log = logging.getLogger(__name__)
ORDER = list(STAGES)
# (project root, stage) -> set when that stage of the running pipeline has ended: a stage that
# runs beside another and needs its output at its very end waits on it
IN_FLIGHT: dict[tuple[str, str], threading.Event] = {}
TRAINING_STAGES = ("pretrain-encoder", "train-decoder", "train-generator")


def family(cfg: Config) -> str:
    """The family a run belongs to on the leaderboard: autoencoder kind / generator kind."""
    return f"{cfg.autoencoder.kind}/{cfg.generator.kind}"


def encoder_label(cfg: Config) -> str:
    """e.g. `dinov2-b (random init)`: untrained weights, and a changed architecture, are said."""
    e = cfg.encoder
    arch = "".join(f", {k} {v}" for k, v in (("depth", e.depth), ("width", e.width),
                                             ("heads", e.heads)) if v is not None)
    return f"{e.name} (random init{arch})" if e.random_init else e.name


def decoder_label(cfg: Config) -> str:
    if cfg.autoencoder.kind == "hybrid-vq":
        return cfg.encoder.name + "-hybrid"
    if cfg.autoencoder.kind == "vae":
        return cfg.encoder.name + ("-ft" if cfg.autoencoder.finetune_decoder else "")
    d = cfg.decoder
    arch = ", ".join(f"{k} {v}" for k, v in (("hidden", d.hidden), ("depth", d.depth),
                                             ("heads", d.heads)) if v is not None)
    return f"{d.model} ({arch})" if arch else d.model


def _group_tags(cfg: Config) -> dict[str, str]:
    s = cfg.sample
    return {"rae.family": family(cfg),
            "rae.dataset": cfg.data.dataset if cfg.data.dataset != "folder" else
            Path(cfg.data.source or cfg.data.root).name,
            "rae.resolution": str(cfg.data.resolution), "rae.extractor": "", "rae.reference": "",
            "rae.num_samples": str(s.num_per_class * cfg.data.num_classes),
            "rae.model": cfg.generator.model, "rae.encoder": encoder_label(cfg),
            "rae.decoder": decoder_label(cfg), "rae.steps": str(cfg.generator.steps),
            "rae.sampler": s.sampler, "rae.sampling_steps": str(s.steps),
            "rae.guidance": s.guidance, "rae.scale": str(s.scale if s.guidance != "none" else 0)}


def registered_name(cfg: Config, kind: str) -> str:
    """e.g. rae-generator-digits-32; a VAE family's models are vae-..., kept apart."""
    tags = _group_tags(cfg)
    return f"{cfg.autoencoder.kind}-{kind}-{tags['rae.dataset']}-{cfg.data.resolution}"


def _register_model(name: str, cfg: Config, paths: Paths, run_id: str) -> None:
    """Register the model a training stage produced (other stages produce none)."""
    if name not in ("train-decoder", "train-generator"):
        return
    if name == "train-generator":
        # the model carries the decoder, which train-decoder may still be training beside it
        if (decoder_done := IN_FLIGHT.get((str(paths.root), "train-decoder"))) is not None:
            decoder_done.wait()
        if not (paths.decoder_dir / "decoder.pt").exists():
            log.warning("train-generator: not registered, no decoder in %s yet; `rae stage "
                        "train-generator --force` after train-decoder registers it",
                        paths.decoder_dir)
            return
    tracking.call(run_id, "register", stage=name, cfg=cfg.to_dict(), root=str(paths.root))


@tracking.op("register")
def _register(run_id: str, stage: str, cfg: dict, root: str) -> None:
    """The tracking operation that registers a training stage's model (`rae sync` replays it)."""
    cfg_, paths = from_dict(cfg), Paths.at(root)
    if stage == "train-decoder":
        from rae_core.autoencoder import load_decoder, load_encoder

        enc = load_encoder(cfg_, paths)
        version = tracking.register(run_id, load_decoder(cfg_, paths, enc),
                                    registered_name(cfg_, "decoder"),
                                    {"preset": cfg_.preset, "encoder": cfg_.encoder.name})
    else:
        from functools import partial

        from flows.pyfunc_model import log_generator

        # a pyfunc model that makes images: the generator with its decoder and statistics
        version = tracking.register(run_id, partial(log_generator, cfg_, paths),
                                    registered_name(cfg_, "generator"),
                                    {"preset": cfg_.preset, "model": cfg_.generator.model})
        (paths.generator_dir / "registered.json").write_text(json.dumps(
            {"name": registered_name(cfg_, "generator"), "version": version}))
    tracking.client().set_tag(run_id, "rae.registered_version", version)


def _after_stage(name: str, cfg: Config, paths: Paths, run_id: str, out: dict) -> None:
    """Artifacts of a finished stage, and the leaderboard's champion after an evaluation."""
    if name == "sample":
        tracking.log_artifact(run_id, paths.samples_dir / "grid.png", "images")
    elif name == "evaluate":
        tags = _group_tags(cfg)
        tags["rae.extractor"] = str(out.get("extractor", ""))
        tags["rae.reference"] = str(out.get("reference", ""))  # the train split or an ADM batch
        tags["rae.kind"] = tracking.EVAL_KIND
        reg = paths.generator_dir / "registered.json"
        if reg.exists():
            tags["rae.generator_version"] = json.loads(reg.read_text())["version"]
        tracking.set_tags(run_id, tags)
        tracking.log_artifact(run_id, paths.evaluate_dir / "metrics.json")
        for extra in ("fid_vs_step.png", "fid_curve.json"):
            if (paths.evaluate_dir / extra).exists():
                tracking.log_artifact(run_id, paths.evaluate_dir / extra, "images")
        grid = paths.samples_dir / "grid.png"
        if grid.exists():
            tracking.log_artifact(run_id, grid, "images")
        if tracking.offline(run_id):
            log.warning("evaluate: the champion alias and the leaderboard table wait for the "
                        "tracking server; `rae sync`, then `rae stage evaluate --force`")
            return
        if reg.exists():
            from flows.leaderboard import crown_champion

            tracking.end_run(run_id)
            tracking.retrying(crown_champion, cfg.tracking.experiment,
                              registered_name(cfg, "generator"), tags["rae.dataset"],
                              tags["rae.resolution"], family(cfg))
        _leaderboard_table(cfg.tracking.experiment)


def _leaderboard_table(experiment: str) -> None:
    """The leaderboard as a Prefect artifact: a report, which a Prefect server that stopped
    answering must not turn into a failed evaluation."""
    from flows.artifacts import leaderboard_table
    from flows.leaderboard import rows

    try:
        leaderboard_table(rows(experiment), experiment)
    except Exception as e:  # noqa: BLE001 - the stage's outputs are made and logged already
        log.warning("evaluate: no leaderboard table in the Prefect run (%s)", one_line(e))


def run_stage(name: str, cfg: Config, paths: Paths, parent: str | None,
              register: bool = True) -> dict:
    """One stage inside its MLflow run; a failure marks the run FAILED with the one-line reason.
    `register=False` leaves a training stage's model out of the registry (ablation arms are
    experiments, not candidates for the champion alias)."""
    console.stage_started(name)
    t_track = time.time()
    resuming = paths.has_resume_point(name)
    run_id = tracking.stage_run(cfg, paths.root, name, parent,
                                tags={"rae.stage": name, "rae.encoder": encoder_label(cfg)},
                                resuming=resuming)
    t0 = time.time()
    try:
        system = tracking.system_metrics(run_id) if name in TRAINING_STAGES and \
            not tracking.offline(run_id) else contextlib.nullcontext()
        with tracking.MetricsForwarder(run_id, paths.metrics_log(name),
                                       steps=console.training_steps(name, cfg)) as fwd, system:
            out = STAGES[name](cfg, paths)
        t1 = time.time()
        out = dict(out or {})
        out["wall_s"] = t1 - t0
        if cluster := _ray_cluster():
            out["ray_cluster"] = cluster  # logged as a tag: which Ray cluster did the work
        if fwd.first_time is not None:
            out["startup_s"] = fwd.first_time - t0
        # Evaluation metrics keep their plain names: the leaderboard sorts on `fid`.
        tracking.log_numbers(run_id, out, prefix="" if name == "evaluate" else "stage.")
        if register:
            _register_model(name, cfg, paths, run_id)
        _after_stage(name, cfg, paths, run_id, out)
        out["tracking_s"] = (t0 - t_track) + (time.time() - t1)
    except BaseException as e:
        tracking.end_run(run_id, "FAILED", one_line(e))
        raise
    tracking.end_run(run_id)
    console.stage_finished(name, out)
    return out


def _ray_cluster() -> str:
    """The GCS address of the Ray this process joined or started, or '' when it used none."""
    import sys

    ray = sys.modules.get("ray")
    return ray.get_runtime_context().gcs_address if ray and ray.is_initialized() else ""


def root_cause(e: BaseException) -> BaseException:
    """The error under Ray's and Prefect's wrappers: the first RaeError, or the innermost. Ray
    re-raises a worker's error as a RayTaskError that also subclasses the error's own type, so
    its `cause` (the worker's exception itself) is taken before anything else."""
    seen = e
    while True:
        ray_cause = getattr(seen, "cause", None)
        if isinstance(ray_cause, BaseException) and ray_cause is not seen:
            seen = ray_cause
            continue
        if isinstance(seen, RaeError) or seen.__cause__ is None or seen.__cause__ is seen:
            return seen
        seen = seen.__cause__


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(e: BaseException) -> str:
    """The user-facing line of an error, unwrapping Ray's wrappers to the original cause."""
    seen = root_cause(e)
    if type(seen).__module__.startswith(("httpx", "httpcore")) and \
            os.environ.get("PREFECT_API_URL"):
        # only Prefect's client speaks httpx (over httpcore, whose error is the innermost) here;
        # the stages' work is recorded as they end
        return (f"PREFECT_API_URL={os.environ['PREFECT_API_URL']}: the Prefect server stopped "
                f"answering during the run ({type(seen).__name__}); finished stages are kept, "
                "`rae run` again resumes from them")
    msg = [ln for ln in ANSI.sub("", str(seen)).strip().splitlines() if ln.strip()]
    return f"{type(seen).__name__}: {msg[-1] if msg else ''}" if not isinstance(
        seen, RaeError) else (msg[0] if msg else type(seen).__name__)


def _transient(task, task_run, state) -> bool:
    """Retry a stage only for failures that may pass (a lost worker, a dropped connection):
    configuration and data errors fail the same way every time."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - Ray wraps a worker's error; look at its cause
        cause = root_cause(e)
        return not isinstance(cause, RaeError) and "ConfigError" not in type(cause).__name__ \
            and "DataError" not in type(cause).__name__
    return False


@task(cache_policy=NO_CACHE, name="stage", retries=1, retry_delay_seconds=5,
      retry_condition_fn=_transient)
def stage_task(name: str, cfg_dict: dict, root: str, parent: str | None,
               force: bool = False) -> dict:
    """A stage, unless its record shows it finished under the same params, code and inputs:
    then its recorded outputs, with `skipped`."""
    try:
        return _stage(name, from_dict(cfg_dict), Paths.at(root), parent, force)
    finally:
        if (done := IN_FLIGHT.get((str(Paths.at(root).root), name))) is not None:
            done.set()


def _stage(name: str, cfg: Config, paths: Paths, parent: str | None, force: bool) -> dict:
    decision = provenance.decide(name, cfg, paths, force)
    log.info("%s", decision.line())
    if not decision.run:
        console.say(decision.line())
        return {**decision.outputs, "skipped": decision.reason}
    provenance.check_inputs(name, cfg, paths)  # an input of another configuration: refused
    provenance.clear(name, paths)
    grouped = parent is None and tracking.dvc_runner() is not None
    if grouped:  # DVC runs each stage as its own command: their pipeline run groups them
        parent = tracking.dvc_pipeline_run(cfg, paths.root, {"rae.encoder": encoder_label(cfg)})
    try:
        out = run_stage(name, cfg, paths, parent)
    except BaseException as e:
        if grouped:
            tracking.end_run(parent, "FAILED", one_line(e))
        raise
    provenance.record(name, cfg, paths, out)
    if grouped and name == ORDER[-1]:
        tracking.end_run(parent)
    return out


@task(cache_policy=NO_CACHE, name="evaluation-yardstick")
def yardstick_task(cfg_dict: dict, root: str) -> None:
    """evaluate's domain classifier and reference features, made on a Ray worker while the
    encoder pretrains (one worker: the other core is idle there) rather than at the start of
    evaluate, which waits for this task. If it fails, evaluate meets the cause and reports it."""
    from rae_core.evaluation import yardstick
    from rae_core.train.runner import run_on_worker

    try:
        run_on_worker(yardstick, cfg_dict, root, cfg=from_dict(cfg_dict))
    except Exception as e:  # noqa: BLE001 - evaluate computes what is missing and says why
        log.info("evaluation yardstick not made ahead of evaluate: %s", one_line(e))


def _yardstick_ahead(cfg: Config, paths: Paths, names: list[str], force: set[str]) -> bool:
    """Whether the run makes evaluate's domain classifier beside the earlier stages: evaluate
    will run, and scores with a classifier trained on the dataset (the one costly part)."""
    return "evaluate" in names and cfg.evaluate.extractor == "domain" and \
        provenance.decide("evaluate", cfg, paths, "evaluate" in force).run


@flow(name="rae-pipeline", flow_run_name=flow_run_name)
def pipeline_flow(cfg: Config, root: str, until: str | None = None,
                  force: list[str] | None = None) -> dict:
    """prepare -> pretrain-encoder -> stats -> extract -> train-decoder -> train-generator -> sample
    -> evaluate, one task each, under one parent MLflow run; finished stages are skipped, those
    in `force` run again. The typed `cfg` gives a deployment run its form in the Prefect UI."""
    with project_lock(root, "rae run"), _unlogged_said():
        return _pipeline(cfg, Paths.at(root), cfg.to_dict(), root, until, set(force or ()))


@contextlib.contextmanager
def _unlogged_said():
    """At the end of a run, one line on what its tracking server did not get, if anything."""
    try:
        yield
    finally:
        if line := tracking.unlogged_line():
            log.info("%s", line)
            console.say(line)


def _pipeline(cfg: Config, paths: Paths, cfg_dict: dict, root: str, until: str | None,
              force: set[str]) -> dict:
    last = ORDER.index(until) if until else len(ORDER) - 1
    parent = tracking.start_run(cfg, paths.root, f"pipeline-{cfg.preset}",
                                tags={"rae.kind": "pipeline", "rae.encoder": encoder_label(cfg)})
    t0, outputs, futures = time.time(), {}, {}
    try:
        names = ORDER[: last + 1]
        if any(provenance.decide(n, cfg, paths, n in force).run for n in names):
            from rae_core.train.runner import ensure_ray, warm_workers

            ensure_ray(cfg)  # once, before stages start side by side
            warm_workers(cfg)
        # Each stage starts when the stages it reads from are done, so independent ones
        # (train-decoder beside stats, extract and train-generator) share the workers.
        for name in names:
            IN_FLIGHT[(str(paths.root), name)] = threading.Event()
        ahead = _yardstick_ahead(cfg, paths, names, force)
        early = None
        for name in names:
            after = [futures[u] for u in provenance.SPECS[name].upstream if u in futures]
            if name == "evaluate" and early is not None:
                after.append(early)
            futures[name] = stage_task.with_options(name=name).submit(
                name, cfg_dict, root, parent, name in force, wait_for=after)
            if name == "prepare" and ahead:
                early = yardstick_task.submit(cfg_dict, root, wait_for=[futures[name]])
        wait(list(futures.values()) + ([early] if early else []))
        for name in names:  # the first failure in pipeline order is the one reported
            outputs[name] = futures[name].result()
    except BaseException as e:
        tracking.end_run(parent, "FAILED", one_line(e))
        raise
    finally:
        for name in names:
            IN_FLIGHT.pop((str(paths.root), name), None)
    totals = {"wall_s": time.time() - t0,
              "ray_startup_s": sum(o.get("startup_s", 0.0) for o in outputs.values()),
              "tracking_s": sum(o.get("tracking_s", 0.0) for o in outputs.values())}
    if os.environ.get("RAE_T0"):
        totals["prefect_startup_s"] = t0 - float(os.environ["RAE_T0"])
    skipped = [n for n, o in outputs.items() if "skipped" in o]
    totals["stages_skipped"] = len(skipped)
    tracking.log_numbers(parent, totals, prefix="pipeline.")
    log.info("pipeline timings: %s", {k: round(v, 1) for k, v in totals.items()})
    tracking.end_run(parent)
    if len(skipped) < len(names):
        from flows import dvc_lock

        if line := dvc_lock.record(cfg, paths.root, names):
            console.say(line)
    console.run_finished(paths, totals["wall_s"])
    return outputs


# What a deployment's job variables hand a run; a `{{ $NAME }}` left in one means the
# deployment was registered without NAME in the environment (infra/prefect/prefect.yaml).
JOB_ENV = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAE_PROJECT_DIR")


@flow(name="rae-run", flow_run_name=flow_run_name)
def run_flow(preset: str | None = None, overrides: list[str] | None = None,
             until: str | None = None, force: list[str] | None = None,
             params: Config | None = None) -> dict:
    """`rae run [--preset P] [--set KEY=VALUE ...] [--until STAGE] [--force STAGE]` for a
    deployment: in the project directory its pull step entered, with the Ray cluster and the
    tracking server its job variables name. Without a preset, the project's params.yaml;
    `params`, a whole configuration filled in on the Prefect UI's form, replaces both."""
    for key in JOB_ENV:
        if "{{" in os.environ.get(key, ""):
            raise ConfigError(f"{key}={os.environ[key]}: the deployment was registered without "
                              "that variable set; export the values of infra/prefect/"
                              "cluster-*.env and run `prefect deploy` again")
    if until is not None and until not in ORDER:
        raise ConfigError(f"until={until}: not a stage (valid: {', '.join(ORDER)})")
    for name in force or ():
        if name not in ORDER:
            raise ConfigError(f"force={name}: not a stage (valid: {', '.join(ORDER)})")
    root = Path.cwd()
    from flows.env import configure
    from rae_core.presets import load_config
    from rae_core.validate import check_registries

    cfg = from_dict(params.to_dict()) if params is not None else \
        load_config(str(root / "params.yaml"), preset, list(overrides or []))
    check_registries(cfg)
    configure(root)
    return pipeline_flow(cfg, str(root), until, force)


@flow(name="rae-stage", flow_run_name=flow_run_name)
def stage_flow(name: str, cfg: Config, root: str, force: bool = False) -> dict:
    with project_lock(root, f"rae stage {name}"), _unlogged_said():
        return stage_task.with_options(name=name)(name, cfg.to_dict(), root, None, force)

"""`rae ablate`: the paper's key ablations at small scale, as one Prefect flow.

MLflow: a parent run `ablate-<preset>` (rae.kind=ablation) holds a child run per arm and seed
(rae.ablation, rae.arm, rae.seed), which holds that arm's stage runs. Every arm runs in its own
project root runs/ablate/<preset>/<arm>-s<seed>/ whose inputs are links: the dataset, encoder,
statistics and latents of a shared root (one for RAE latents, one for pixels), and the decoder
or DiT of the arm it reuses. Arms run side by side in `lanes` threads (Ray Train start-up, not
compute, dominates small arms). The report (markdown, JSON, plots) lands in runs/ablate/<preset>/.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import tracking
from flows.pipeline import one_line, run_stage
from rae_core import ablations as ablation
from rae_core.config import Config, from_dict
from rae_core.errors import RaeError
from rae_core.locking import project_lock
from rae_core.paths import Paths

log = logging.getLogger(__name__)

SHARED, SHARED_PIXELS = "shared", "shared-pixels"
# What an arm's root takes from the shared root of its latents, relative to a project root.
SHARED_INPUTS = ("data/dataset", "models/encoder", "models/stats", "data/latents")


def ablation_dir(root: str | Path, preset: str) -> Path:
    return Path(root).resolve() / "runs" / "ablate" / preset


def _link(target: Path, link: Path) -> None:
    """Make `link` a relative symlink to `target`, replacing an earlier link."""
    if link.exists() and not link.is_symlink():
        raise RaeError(f"{link}: expected a link to {target}, found a real file or folder; "
                       "delete it and re-run `rae ablate`")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=target.is_dir())


def _yardstick(cfg: Config, paths: Paths) -> None:
    """The domain classifier and reference features every evaluation scores with, computed once
    before arms run side by side (evaluate caches them under models/reference)."""
    from rae_core.evaluation import build_extractor, reference

    extractor, _ = build_extractor(cfg, paths)
    reference(cfg, paths, extractor)


@task(cache_policy=NO_CACHE, name="shared")
def shared_task(base: dict, root: str, parent: str) -> None:
    """The stages every arm shares: dataset, encoder, statistics and latents, for RAE latents
    and (statistics and latents only) for pixels; then the evaluation yardstick."""
    cfg = from_dict(base)
    top = ablation_dir(root, cfg.preset)
    run_id = tracking.start_run(cfg, Paths.at(root).root, SHARED, parent,
                                tags={"rae.arm": SHARED})
    try:
        paths = Paths.at(top / SHARED)
        for name in ("prepare", "pretrain-encoder", "stats", "extract"):
            run_stage(name, cfg, paths, run_id)
        pix_cfg = from_dict({**base, "encoder": {**base["encoder"], "name": "pixels"}})
        pix = Paths.at(top / SHARED_PIXELS)
        _link(paths.dataset(cfg.data.root), pix.dataset(cfg.data.root))
        for name in ("stats", "extract"):
            run_stage(name, pix_cfg, pix, run_id)
        _yardstick(cfg, paths)
    except BaseException as e:
        tracking.end_run(run_id, "FAILED", one_line(e))
        raise
    tracking.end_run(run_id)


def _prepare_root(preset: str, arm: ablation.Arm, seed: int, root: str) -> Paths:
    """The arm's project root, its inputs linked from the roots that produced them."""
    top = ablation_dir(root, preset)
    paths = Paths.at(top / f"{arm.name}-s{seed}")
    shared = top / (SHARED_PIXELS if arm.latents == "pixels" else SHARED)
    for rel in SHARED_INPUTS:
        if (shared / rel).exists():
            _link(shared / rel, paths.root / rel)
    _link(Paths.at(top / SHARED).reference_dir, paths.reference_dir)
    for source, rel in ((arm.decoder_from, "models/decoder"), (arm.generator_from, "models/generator")):
        if source is not None:
            _link(top / f"{source}-s{seed}" / rel, paths.root / rel)
    return paths


@task(cache_policy=NO_CACHE, name="arm")
def arm_task(preset: str, arm: ablation.Arm, cfg_dict: dict, yardstick_seed: int, root: str,
             parent: str) -> dict[str, dict]:
    """One arm and seed under its own MLflow run: the overfit, or its stages. Returns
    metric -> {value, run_id} of the run that logged each number."""
    cfg = from_dict(cfg_dict)
    paths = _prepare_root(preset, arm, cfg.seed, root)
    tags = {"rae.ablation": ",".join(arm.ablations), "rae.arm": arm.name,
            "rae.seed": str(cfg.seed), "rae.description": arm.description}
    for source, what in ((arm.decoder_from, "decoder"), (arm.generator_from, "generator")):
        if source is not None:
            tags[f"rae.{what}_from"] = f"{source}-s{cfg.seed}"
    run_id = tracking.start_run(cfg, Paths.at(root).root, f"{arm.name}-s{cfg.seed}", parent,
                                tags)
    numbers = {"steps": arm.steps, "batch": arm.batch, "train_flops": arm.train_flops,
               "flops_per_image": arm.flops_per_image}
    found: dict[str, dict] = {}
    try:
        if arm.overfit:
            out = ablation.overfit_one_latent(cfg, paths, arm.steps, arm.batch)
            _log_curve(run_id, out.pop("curve"))
            ablation.write_atomic(paths.root / "overfit.json", json.dumps(out))
            numbers.update(out)
        else:
            for name in arm.stages:
                if name.startswith("train-") or name == "sample":
                    run_stage(name, cfg, paths, run_id, register=False)
                else:
                    # evaluate keys its classifier and reference features by the seed: every
                    # arm and seed is scored with the same ones, the base seed's
                    ev = from_dict({**cfg_dict, "seed": yardstick_seed})
                    out = run_stage(name, ev, paths, run_id)
                    tracking.log_numbers(run_id, {"extractor": out["extractor"]})
            found = _evaluation_numbers(run_id)
        tracking.log_numbers(run_id, numbers)
    except BaseException as e:
        tracking.end_run(run_id, "FAILED", one_line(e))
        raise
    tracking.end_run(run_id)
    return {**{k: {"value": float(v), "run_id": run_id} for k, v in numbers.items()}, **found}


def _evaluation_numbers(arm_run: str) -> dict[str, dict]:
    """The evaluate stage run's numbers, linked to that run."""
    c = tracking.client()
    (run,) = c.search_runs([c.get_run(arm_run).info.experiment_id],
                           filter_string=f"tags.mlflow.parentRunId = '{arm_run}' and "
                                         "tags.`rae.stage` = 'evaluate'")
    m = run.data.metrics
    return {k: {"value": m[k], "run_id": run.info.run_id}
            for k in ("fid", "class_accuracy", "rfid", "recon_psnr") if k in m}


def _log_curve(run_id: str, curve: list[tuple[int, float]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    tracking.client().log_batch(run_id, metrics=[Metric("loss", v, now, s) for s, v in curve])


def write_report(plan: ablation.Plan, report: dict, parent: str, root: str) -> Path:
    """report.md, report.json and a plot per ablation, written atomically, logged to `parent`."""
    top = ablation_dir(root, plan.preset)
    c = tracking.client()
    for letter in ablation.ABLATIONS:
        png = ablation.plot_ablation(report, letter, top / "plots" / f"{letter}.png")
        c.log_artifact(parent, str(png), artifact_path="plots")
    ablation.write_atomic(top / "report.json", json.dumps(report, indent=1))
    ablation.write_atomic(top / "report.md", ablation.render_markdown(report))
    for name in ("report.md", "report.json"):
        c.log_artifact(parent, str(top / name))
    return top / "report.md"


@flow(name="rae-ablate", task_runner=ThreadPoolTaskRunner(max_workers=ablation.LANES))
def ablate_flow(cfg_dict: dict, root: str) -> str:
    """Shared stages once, then every arm for every seed, then the report."""
    cfg = from_dict(cfg_dict)
    with project_lock(root, f"rae ablate (preset {cfg.preset})"):
        return _ablate(ablation.make_plan(cfg), root)


def _ablate(plan: ablation.Plan, root: str) -> str:
    t0 = time.time()
    parent = tracking.start_run(from_dict(plan.base), Paths.at(root).root,
                                f"ablate-{plan.preset}", tags={"rae.kind": "ablation"})
    try:
        shared_task(plan.base, root, parent)
        # Arms that reuse nothing first: the pool is first-in first-out and a waiting task
        # holds its thread, so every arm's sources are running or done before it starts.
        # The cheap in-process overfits come last, to fill the lane that frees first.
        order = sorted(plan.arms, key=lambda a: (a.overfit, a.decoder_from is not None or
                                                 a.generator_from is not None))
        futures = {}
        for seed in plan.seeds:
            for arm in order:
                sources = [futures[s, seed] for s in (arm.decoder_from, arm.generator_from) if s]
                futures[arm.name, seed] = arm_task.with_options(name=f"{arm.name}-s{seed}").submit(
                    plan.preset, arm, arm.config(plan.base, seed), plan.seeds[0], root, parent,
                    wait_for=sources)
        results = {a.name: {s: futures[a.name, s].result() for s in plan.seeds}
                   for a in plan.arms}
        fid_run = results["reference"][plan.seeds[0]]["fid"]["run_id"]
        extractor = tracking.client().get_run(fid_run).data.tags["extractor"]
        report = ablation.build_report(plan, results, parent, extractor, time.time() - t0)
        tracking.log_numbers(parent, ablation.parent_metrics(report))
        path = write_report(plan, report, parent, root)
    except BaseException as e:
        tracking.end_run(parent, "FAILED", one_line(e))
        raise
    tracking.end_run(parent)
    log.info("ablation report: %s", path)
    return str(path)

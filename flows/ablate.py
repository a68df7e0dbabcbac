"""`rae ablate`: the paper's key ablations at small scale, as one Prefect flow.

MLflow: a parent run `ablate-<preset>` (rae.kind=ablation) holds a child run per root and per
arm and seed (rae.ablation, rae.arm, rae.seed), which holds that root's or arm's stage runs.
The dataset's root prepares the dataset and the evaluation yardstick; the other roots build on
it (or on one another) with the encoder, statistics, latents and perhaps a decoder of one latent
space. Every arm runs in its own project root runs/ablate/<preset>/<arm>-s<seed>/ whose inputs
are links to its root's outputs and to the decoder or generator of the arm it reuses. Roots and
arms run side by side in `lanes` threads (Ray Train start-up, not compute, dominates small
arms). The report (markdown, JSON, plots) lands in runs/ablate/<preset>/.
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
from flows.artifacts import markdown_report
from flows.pipeline import one_line, run_stage
from flows.source import flow_run_name
from rae_core.ablations import make_plan
from rae_core.ablations.compute import train_flops
from rae_core.ablations.overfit import overfit_one_latent
from rae_core.ablations.plan import DATASET, LANES, METRICS, Arm, Plan, Root
from rae_core.ablations.plots import curve_arms, plot_ablation, plot_curves
from rae_core.ablations.report import (
    build_report,
    number,
    parent_numbers,
    render_markdown,
    write_atomic,
)
from rae_core.config import Config, from_dict
from rae_core.errors import RaeError
from rae_core.locking import project_lock
from rae_core.paths import Paths
from rae_core.train.runner import ensure_ray

log = logging.getLogger(__name__)

# What a root gives the arms on its latents, relative to a project root (those it has).
ROOT_OUTPUTS = ("data/dataset", "models/encoder", "models/stats", "data/latents",
                "models/decoder")


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


def _link_outputs(source: Path, paths: Paths) -> None:
    """Link what a root has produced into another project root."""
    for rel in ROOT_OUTPUTS:
        if (source / rel).exists():
            _link(source / rel, paths.root / rel)


@task(cache_policy=NO_CACHE, name="root")
def root_task(plan: Plan, root: Root, project: str, parent: str) -> None:
    """A root's stages under its own MLflow run, after linking the outputs of the root it builds
    on; the dataset's root also computes the evaluation yardstick."""
    cfg = from_dict(root.config(plan.base))
    top = ablation_dir(project, plan.preset)
    run_id = tracking.start_run(cfg, Paths.at(project).root, root.name, parent,
                                tags={"rae.arm": root.name,
                                      "rae.ablation": ",".join(plan.root_serves(root))})
    try:
        paths = Paths.at(top / root.name)
        if root.base is not None:
            _link_outputs(top / root.base.name, paths)
        for name in root.stages:
            run_stage(name, cfg, paths, run_id, register=False)
        if root == DATASET:
            from rae_core.evaluation import yardstick

            # evaluate caches it under models/reference: computed once, before arms run
            # side by side
            yardstick(cfg.to_dict(), str(paths.root))
    except BaseException as e:
        tracking.end_run(run_id, "FAILED", one_line(e))
        raise
    tracking.end_run(run_id)


def _prepare_root(preset: str, arm: Arm, seed: int, project: str) -> Paths:
    """The arm's project root, its inputs linked from the roots that produced them."""
    top = ablation_dir(project, preset)
    paths = Paths.at(top / f"{arm.name}-s{seed}")
    _link_outputs(top / arm.root.name, paths)
    _link(Paths.at(top / DATASET.name).reference_dir, paths.reference_dir)
    for source, rel in ((arm.decoder_from, "models/decoder"),
                        (arm.generator_from, "models/generator")):
        if source is not None:
            _link(top / f"{source}-s{seed}" / rel, paths.root / rel)
    return paths


@task(cache_policy=NO_CACHE, name="arm")
def arm_task(plan: Plan, arm: Arm, seed: int, project: str, parent: str) -> dict:
    """One arm and seed under its own MLflow run: the overfit, or its stages. Returns
    metric -> {value, run_id} of the run that logged each number, and the FID curve where the
    arm scored its checkpoints."""
    cfg_dict = arm.config(plan.base, seed)
    cfg = from_dict(cfg_dict)
    paths = _prepare_root(plan.preset, arm, seed, project)
    tags = {"rae.ablation": ",".join(plan.served[arm.name]), "rae.arm": arm.name,
            "rae.seed": str(seed), "rae.description": arm.description}
    for source, what in ((arm.decoder_from, "decoder"), (arm.generator_from, "generator")):
        if source is not None:
            tags[f"rae.{what}_from"] = f"{source}-s{seed}"
    run_id = tracking.start_run(cfg, Paths.at(project).root, f"{arm.name}-s{seed}", parent,
                                tags)
    numbers = {"steps": arm.steps, "batch": arm.batch, "train_flops": arm.train_flops,
               "flops_per_image": arm.flops_per_image}
    found: dict = {}
    try:
        if arm.overfit:
            out = overfit_one_latent(cfg, paths, arm.steps, arm.batch)
            _log_metrics(run_id, [("loss", v, s) for s, v in out.pop("curve")])
            write_atomic(paths.root / "overfit.json", json.dumps(out))
            numbers.update(out)
        else:
            for name in arm.stages:
                if name.startswith("train-") or name == "sample":
                    run_stage(name, cfg, paths, run_id, register=False)
                else:
                    # evaluate keys its classifier and reference features by the seed: every
                    # arm and seed is scored with the same ones, the base seed's
                    ev = from_dict({**cfg_dict, "seed": plan.seeds[0]})
                    _checkpoints_as(cfg, ev, paths)
                    out = run_stage(name, ev, paths, run_id)
                    tracking.log_numbers(run_id, {"extractor": out["extractor"]})
            found = _evaluation_numbers(run_id)
            curve = paths.evaluate_dir / "fid_curve.json"
            if curve.exists() and (points := json.loads(curve.read_text())):  # [] when off
                found["curve"] = _log_curve(run_id, arm, points)
        tracking.log_numbers(run_id, numbers)
    except BaseException as e:
        tracking.end_run(run_id, "FAILED", one_line(e))
        raise
    tracking.end_run(run_id)
    return {**{k: {"value": float(v), "run_id": run_id} for k, v in numbers.items()}, **found}


def _checkpoints_as(cfg: Config, ev: Config, paths: Paths) -> None:
    """evaluate runs under the base seed (its yardstick is keyed by the seed), so its FID curve
    looks for the generator's checkpoints under that seed's configuration: link them there."""
    from rae_core.train.generator import checkpoint_dir

    own, seen = checkpoint_dir(cfg, paths), checkpoint_dir(ev, paths)
    if own.exists() and own != seen:
        _link(own, seen)


def _evaluation_numbers(arm_run: str) -> dict[str, dict]:
    """The evaluate stage run's numbers, linked to that run."""
    c = tracking.client()
    (run,) = c.search_runs([c.get_run(arm_run).info.experiment_id],
                           filter_string=f"tags.mlflow.parentRunId = '{arm_run}' and "
                                         "tags.`rae.stage` = 'evaluate'")
    m = run.data.metrics
    return {k: {"value": m[k], "run_id": run.info.run_id} for k in METRICS if k in m}


def _log_metrics(run_id: str, points: list[tuple[str, float, int]]) -> None:
    """(key, value, step) points to one run, in batches MLflow accepts."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, step) for key, value, step in points]
    for i in range(0, len(metrics), 500):
        tracking.client().log_batch(run_id, metrics=metrics[i: i + 500])


def _log_curve(run_id: str, arm: Arm, curve: list[dict]) -> list[dict]:
    """The evaluate stage's FID at each checkpoint, logged to the arm's run by training step
    with the training FLOPs spent by then."""
    flops = [(c["step"], train_flops(arm.flops_per_image, arm.batch, c["step"])) for c in curve]
    _log_metrics(run_id, [("curve_fid", c["fid"], c["step"]) for c in curve] +
                 [("curve_train_flops", f, s) for s, f in flops])
    return [{"step": c["step"], "fid": number("curve_fid", c["fid"], run_id, c["step"]),
             "train_flops": number("curve_train_flops", f, run_id, c["step"])}
            for c, (_, f) in zip(curve, flops, strict=True)]


def write_report(plan: Plan, report: dict, parent: str, project: str) -> Path:
    """report.md, report.json and the plots of each ablation, written atomically, logged to
    `parent`."""
    top = ablation_dir(project, plan.preset)
    c = tracking.client()
    for letter in plan.letters:
        pngs = [plot_ablation(report, letter, top / "plots" / f"{letter}.png")]
        if curve_arms(report, letter):
            pngs.append(plot_curves(report, letter, top / "plots" / f"{letter}-curve.png"))
        for png in pngs:
            c.log_artifact(parent, str(png), artifact_path="plots")
    write_atomic(top / "report.json", json.dumps(report, indent=1))
    write_atomic(top / "report.md", render_markdown(report))
    for name in ("report.md", "report.json"):
        c.log_artifact(parent, str(top / name))
    return top / "report.md"


@flow(name="rae-ablate", task_runner=ThreadPoolTaskRunner(max_workers=LANES),
      flow_run_name=flow_run_name)
def ablate_flow(cfg_dict: dict, project: str, letters: tuple[str, ...] | None = None) -> str:
    """Shared roots once, then every arm for every seed, then the report."""
    cfg = from_dict(cfg_dict)
    with project_lock(project, f"rae ablate (preset {cfg.preset})"):
        return _ablate(make_plan(cfg, letters), project)


def _ablate(plan: Plan, project: str) -> str:
    t0 = time.time()
    parent = tracking.start_run(from_dict(plan.base), Paths.at(project).root,
                                f"ablate-{plan.preset}",
                                tags={"rae.kind": "ablation",
                                      "rae.ablations": ",".join(plan.letters)})
    try:
        # Ray starts here, once: roots running side by side would race to start it.
        ensure_ray(from_dict(plan.base))
        # The pool is first-in first-out and a waiting task holds its thread, so everything is
        # submitted after what it waits for: the roots, each after its base, then arms that
        # reuse nothing, those on roots that are ready first before the others, then the rest.
        # The cheap in-process overfits come last, to fill the lane that frees first.
        roots = {}
        for r in plan.roots:
            waits = [roots[r.base.name]] if r.base is not None else []
            roots[r.name] = root_task.with_options(name=r.name).submit(
                plan, r, project, parent, wait_for=waits)
        order = sorted(plan.arms, key=lambda a: (a.overfit, bool(a.sources), a.root.depth))
        futures = {}
        for seed in plan.seeds:
            for arm in order:
                waits = [roots[arm.root.name]] + [futures[s, seed] for s in arm.sources]
                futures[arm.name, seed] = arm_task.with_options(name=f"{arm.name}-s{seed}").submit(
                    plan, arm, seed, project, parent, wait_for=waits)
        results = {a.name: {s: futures[a.name, s].result() for s in plan.seeds}
                   for a in plan.arms}
        scored = [r[plan.seeds[0]]["fid"]["run_id"] for r in results.values()
                  if "fid" in r[plan.seeds[0]]]
        extractor = tracking.client().get_run(scored[0]).data.tags["extractor"] if scored \
            else "none"  # (a) alone scores no samples
        report = build_report(plan, results, parent, extractor, time.time() - t0)
        _log_metrics(parent, [(n["metric"], n["value"], n.get("step", 0))
                              for n in parent_numbers(report)])
        path = write_report(plan, report, parent, project)
        markdown_report(path, f"ablation-{plan.preset}", f"Ablation report of {plan.preset}, "
                        f"MLflow run {parent}")
    except BaseException as e:
        tracking.end_run(parent, "FAILED", one_line(e))
        raise
    tracking.end_run(parent)
    log.info("ablation report: %s", path)
    return str(path)

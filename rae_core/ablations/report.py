"""The report, built from measured numbers only: a verdict per claim, FID curves against training
compute, the tables an ablation set adds, and what every arm is and cost.

Every number in the report is {"metric", "value", "run_id"} (plus "step" on a curve): the MLflow
run that logged it. Means, spreads and numbers derived across runs belong to the parent run.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Literal

from rae_core.ablations.plan import METRICS, Plan

HOLDS = "holds"
MIXED = "holds on average, not on every seed"
DOES_NOT_HOLD = "does not hold"


def verdict(winner: dict[int, float], loser: dict[int, float],
            better: Literal["lower", "higher"]) -> str:
    """Whether the paper's direction (winner better than loser) holds, paired by seed."""
    seeds = sorted(winner.keys() & loser.keys())
    if not seeds:
        raise ValueError("no seed has numbers for both arms")
    sign = 1.0 if better == "lower" else -1.0
    gains = [sign * (loser[s] - winner[s]) for s in seeds]
    if statistics.fmean(gains) <= 0:
        return DOES_NOT_HOLD
    return HOLDS if all(g > 0 for g in gains) else MIXED


def spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def number(metric: str, value: float, run_id: str, step: int | None = None) -> dict:
    out = {"metric": metric, "value": float(value), "run_id": run_id}
    return out if step is None else {**out, "step": step}


def summary(plan: Plan, results: dict, arm: str, metric: str, key: str, parent: str) -> dict:
    """One arm's metric over the seeds: each seed's number, and the mean and spread, logged to
    the parent under `key`.mean and `key`.sd."""
    values = [{"seed": s, **number(metric, results[arm][s][metric]["value"],
                                   results[arm][s][metric]["run_id"])} for s in plan.seeds]
    mean, sd = spread([v["value"] for v in values])
    return {"arm": arm, "values": values, "mean": number(f"{key}.mean", mean, parent),
            "sd": None if sd is None else number(f"{key}.sd", sd, parent)}


def mean_curve(report: dict, arm: str) -> list[tuple[float, float]]:
    """(training FLOPs, FID averaged over seeds) at each checkpoint of an arm."""
    return [(p["train_flops"]["value"], p["mean"]["value"]) for p in report["curves"][arm]]


def _curves(plan: Plan, results: dict, parent: str) -> dict[str, list[dict]]:
    """Arms with a FID at each checkpoint: per point its step, training FLOPs, every seed's FID
    and their mean."""
    out = {}
    for arm in plan.arms:
        runs = results[arm.name]
        if not runs[plan.seeds[0]].get("curve"):
            continue
        points = []
        for i, p in enumerate(runs[plan.seeds[0]]["curve"]):
            fids = [{"seed": s, **runs[s]["curve"][i]["fid"]} for s in plan.seeds]
            points.append({
                "step": p["step"], "train_flops": p["train_flops"], "fid": fids,
                "mean": number(f"curve.{arm.name}.fid.mean",
                               statistics.fmean(f["value"] for f in fids), parent, p["step"])})
        out[arm.name] = points
    return out


def build_report(plan: Plan, results: dict[str, dict[int, dict]], parent_run_id: str,
                 extractor: str, wall_s: float) -> dict:
    """The report as data. `results[arm][seed][metric]` = {"value", "run_id"} of the run that
    logged it; `results[arm][seed]["curve"]` = [{"step", "fid", "train_flops"}] where the arm
    scored its checkpoints."""
    arms = {}
    for arm in plan.arms:
        first = results[arm.name][plan.seeds[0]]
        arms[arm.name] = {
            "description": arm.description, "ablations": plan.served[arm.name],
            "model": arm.model,
            "runs": {str(s): results[arm.name][s]["steps"]["run_id"] for s in plan.seeds},
            **{k: number(k, first[k]["value"], first[k]["run_id"])
               for k in ("steps", "train_flops")}}
    rows = []
    for c in plan.claims:
        sides = {side: summary(plan, results, name, metric, f"{c.ablation}.{name}.{metric}",
                               parent_run_id)
                 for side, name, metric in (("winner", c.winner, c.metric),
                                            ("loser", c.loser, c.loser_key))}
        by_seed = {n: {v["seed"]: v["value"] for v in s["values"]} for n, s in sides.items()}
        rows.append({"ablation": c.ablation, "title": plan.titles[c.ablation], "case": c.case,
                     "metric": c.metric, "loser_metric": c.loser_key, "better": c.better,
                     "paper": c.paper, **sides,
                     "verdict": verdict(by_seed["winner"], by_seed["loser"], c.better)})
    report = {"preset": plan.preset, "parent_run_id": parent_run_id,
              "experiment": plan.base["tracking"]["experiment"], "extractor": extractor,
              "letters": list(plan.letters), "seeds": list(plan.seeds), "arms": arms,
              "claims": rows, "curves": _curves(plan, results, parent_run_id),
              "wall_s": number("ablate.wall_s", wall_s, parent_run_id)}
    report["tables"] = [t for make in plan.tables
                        for t in make(plan, results, report, parent_run_id)]
    return report


def parent_numbers(report: dict) -> list[dict]:
    """The numbers of the report that belong to the parent run, once each."""
    found = {}

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("run_id") == report["parent_run_id"] and "metric" in node:
                found[node["metric"], node.get("step", 0)] = node
            else:
                for v in node.values():
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(report)
    return list(found.values())


def fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def _cell(cell) -> str:
    """A table cell: text, a number, or an arm's summary over seeds."""
    if cell is None:
        return "—"
    if isinstance(cell, str):
        return cell
    if "mean" not in cell:
        return fmt(cell["value"])
    head = f"**{fmt(cell['mean']['value'])}**"
    if cell["sd"] is None:
        return head
    seeds = ", ".join(fmt(v["value"]) for v in cell["values"])
    return f"{head} ± {fmt(cell['sd']['value'])} ({seeds})"


def render_markdown(report: dict) -> str:
    """report.md: the verdict table, the ablations' own tables, then what every arm is and
    what it cost."""
    ext = report["extractor"]
    lines = [f"# RAE ablations, preset `{report['preset']}`", "",
             f"Ablations {', '.join(report['letters'])}; seeds "
             f"{', '.join(map(str, report['seeds']))}; with several seeds, values are mean "
             "± sample standard deviation, then the per-seed values in seed order. FID and class "
             f"accuracy are measured with the `{ext}` extractor (not Inception: not comparable "
             "with the paper's numbers, only its directions). A verdict compares the arms "
             "seed by seed: *holds* = the paper's direction on every seed.",
             f"MLflow: experiment `{report['experiment']}`, parent run "
             f"`{report['parent_run_id']}`; every number in report.json names its run.", "",
             "| | ablation | metric | paper | paper's better arm | other arm | at this scale |",
             "|---|---|---|---|---|---|---|"]
    for r in report["claims"]:
        label, better = METRICS[r["metric"]]
        label = f"{label} ({ext})" if r["metric"] in ("fid", "class_accuracy") else label
        arrow = "↓" if better == "lower" else "↑"
        title = f"{r['title']}, {r['case']}" if r["case"] else r["title"]
        other = r["loser"]["arm"] if r["loser_metric"] == r["metric"] else \
            f"{r['loser']['arm']} ({METRICS[r['loser_metric']][0]})"
        lines.append(f"| {r['ablation']} | {title} | {label} {arrow} | {r['paper']} | "
                     f"{r['winner']['arm']}: {_cell(r['winner'])} | "
                     f"{other}: {_cell(r['loser'])} | {r['verdict']} |")
    for t in report["tables"]:
        lines += ["", f"## ({t['ablation']}) {t['title']}", "",
                  "| " + " | ".join(t["columns"]) + " |",
                  "|" + "---|" * len(t["columns"])]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t["rows"]]
        if t.get("note"):
            lines += ["", t["note"]]
    lines += ["", "## Arms", "", "| arm | ablations | what | steps | training FLOPs |",
              "|---|---|---|---|---|"]
    for name, a in report["arms"].items():
        lines.append(f"| {name} | {', '.join(a['ablations'])} | {a['description']} | "
                     f"{a['steps']['value']:.0f} | {a['train_flops']['value']:.3e} |")
    lines += ["", "Training FLOPs = 3 x forward FLOPs per image x batch x steps of the generator "
              "(rae_core.models.model_flops_per_image; HART's counted by torch's "
              "FlopCounterMode, rae_core.ablations.compute.scalewise_flops_per_image); arms of "
              "one ablation are matched to the same budget by steps (and, for the plain DiT, "
              "depth).", "",
              f"Wall time: {report['wall_s']['value'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

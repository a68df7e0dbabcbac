"""The report's figures: per ablation, a bar chart per metric, and FID against training compute
where its arms scored their checkpoints."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from rae_core.ablations.plan import METRICS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def _title(report: dict, letter: str) -> str:
    return next(f"({letter}) {r['title']}" for r in report["claims"] if r["ablation"] == letter)


def plot_ablation(report: dict, letter: str, path: Path) -> Path:
    """A bar chart per metric of one ablation: the mean per arm, each seed as a point."""
    plt = _pyplot()
    rows = [r for r in report["claims"] if r["ablation"] == letter]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), dpi=110,
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        per_arm = {s["arm"]: [v["value"] for v in s["values"]]
                   for r in rows if r["metric"] == metric for s in (r["winner"], r["loser"])}
        names = list(per_arm)
        ax.bar(range(len(names)), [statistics.fmean(per_arm[n]) for n in names],
               color="#9ab", edgecolor="#345")
        for i, n in enumerate(names):
            ax.scatter([i] * len(per_arm[n]), per_arm[n], color="#c33", s=14, zorder=3)
        label, better = METRICS[metric]
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{label} ({better} is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(_title(report, letter), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def curve_arms(report: dict, letter: str) -> list[str]:
    """The arms of an ablation that scored their checkpoints: a curve plot needs two."""
    arms = dict.fromkeys(s["arm"] for r in report["claims"] if r["ablation"] == letter
                         for s in (r["winner"], r["loser"]))
    found = [a for a in arms if a in report["curves"]]
    return found if len(found) > 1 else []


def plot_curves(report: dict, letter: str, path: Path) -> Path:
    """FID against training FLOPs per arm of one ablation: the mean over seeds as a line, each
    seed as a point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    for arm in curve_arms(report, letter):
        points = report["curves"][arm]
        flops = [p["train_flops"]["value"] for p in points]
        line, = ax.plot(flops, [p["mean"]["value"] for p in points], marker="o", label=arm)
        for x, p in zip(flops, points, strict=True):
            ax.scatter([x] * len(p["fid"]), [f["value"] for f in p["fid"]], s=10, alpha=0.5,
                       color=line.get_color())
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(f"FID ({report['extractor']})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(report, letter), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)

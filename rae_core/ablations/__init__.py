"""The paper's key ablations at small scale: arms as configuration overrides, matched compute,
the single-sample overfitting experiment, and the report built from measured numbers.

    a  width rule: a DiT narrower than the latent's channels cannot fit even one latent
    b  dimension-dependent time shift vs none
    c  noise-augmented decoder vs the plain one
    d  DiT-DH vs a plain DiT at equal training FLOPs
    e  the same DiT on RAE latents vs on pixels at equal training FLOPs

Arms share what is identical between them (dataset, encoder, statistics, latents, and a decoder
or DiT that an arm does not change); the flow (flows/ablate.py) runs the stages and tracks them.
Training compute of a generator = 3 x forward FLOPs per image x batch x steps.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rae_core.config import Config, apply_overrides, from_dict
from rae_core.errors import ConfigError
from rae_core.paths import Paths


@dataclass(frozen=True)
class AblationSize:
    """How big the ablation is for one preset."""

    seeds: int  # seeds per arm: cfg.seed, cfg.seed + 1, ...
    dit_steps: int  # the DiT-DH reference arm; the other generators get equal FLOPs
    overfit_steps: int  # the widest single-sample overfit; narrower ones get equal FLOPs
    overfit_batch: int  # copies of the one latent per step, each with its own noise and time
    num_per_class: int  # samples per class for FID and class accuracy
    dit_model: str  # the plain DiT of (a), (d) and (e)
    dit_hidden: int  # its width in (d) and (e): >= the pixel latent's 3 x 8 x 8 = 192 channels
    widths: tuple[int, ...] = (32, 64, 96)  # (a): below, at and above the 64 latent channels


SIZES: dict[str, AblationSize] = {
    # a few minutes on 2 CPU cores: the start-up of 8 Ray Train fits (~20 s each) dominates
    "smoke": AblationSize(seeds=1, dit_steps=60, overfit_steps=100, overfit_batch=32,
                          num_per_class=8, dit_model="DiT-micro", dit_hidden=192),
    # ~40 min on 2 CPU cores: per seed 3 decoders (600 steps), 4 generators (~500 steps at
    # ~4 steps/s per lane), 5 x 400 samples with CFG; the shared stages ~5 min
    "tiny": AblationSize(seeds=3, dit_steps=500, overfit_steps=400, overfit_batch=64,
                         num_per_class=40, dit_model="DiT-tiny", dit_hidden=192),
}

# Arms run side by side in this many lanes, each Ray Train worker with its share of the CPUs:
# small arms spend most of their time starting Ray Train workers, which then overlaps.
LANES = 2

ABLATIONS: dict[str, str] = {
    "a": "width rule (one-latent overfit)",
    "b": "dimension-dependent time shift",
    "c": "noise-augmented decoder",
    "d": "DiT-DH vs DiT, equal FLOPs",
    "e": "RAE latents vs pixels, equal FLOPs",
}

METRICS: dict[str, tuple[str, Literal["lower", "higher"]]] = {
    "overfit_loss": ("final loss on one latent", "lower"),
    "fid": ("FID", "lower"),
    "class_accuracy": ("class accuracy", "higher"),
    "rfid": ("rFID", "lower"),
    "recon_psnr": ("reconstruction PSNR", "higher"),
}

HOLDS = "holds"
MIXED = "holds on average, not on every seed"
DOES_NOT_HOLD = "does not hold"


def size_for(preset: str) -> AblationSize:
    if preset not in SIZES:
        raise ConfigError(f"preset {preset!r} has no ablation sizes "
                          f"(valid: {', '.join(SIZES)}); see rae_core/ablations")
    return SIZES[preset]


# ---------------------------------------------------------------------------------------------
# Compute


def train_flops(flops_per_image: float, batch: int, steps: int) -> float:
    """Training FLOPs: forward + backward ~ 3 x forward, per image, per step."""
    return 3.0 * flops_per_image * batch * steps


def matched_steps(target_flops: float, flops_per_image: float, batch: int) -> int:
    """Steps at which a model of `flops_per_image` spends `target_flops` of training compute."""
    return max(1, round(target_flops / train_flops(flops_per_image, batch, 1)))


def matched_depth(model: str, channels: int, grid: int, target_per_image: float,
                  max_depth: int = 32, **overrides: Any) -> int:
    """The depth whose forward FLOPs per image are closest (in ratio) to `target_per_image`, so
    that equal compute also means about equal steps (and the same learning-rate schedule)."""
    from rae_core.models import model_flops_per_image

    def distance(depth: int) -> float:
        f = model_flops_per_image(model, channels, grid, **{**overrides, "depth": depth})
        return abs(math.log(f / target_per_image))

    return min(range(1, max_depth + 1), key=distance)


def latent_shape(cfg: Config, encoder: str | None = None) -> tuple[int, int, int]:
    """(C, H, W) of an encoder's latent, from an untrained instance on the meta device."""
    from rae_core.encoders import build_encoder

    with torch.device("meta"):
        enc = build_encoder(encoder or cfg.encoder.name, cfg.data.resolution, random_init=True)
    return tuple(enc.latent_shape)


# ---------------------------------------------------------------------------------------------
# Arms and claims


@dataclass(frozen=True)
class Arm:
    """One configuration of the ablation, run once per seed in runs/ablate/<preset>/<name>-s<seed>."""

    name: str
    ablations: str  # the letters it serves: the reference arm is the baseline of several
    description: str
    overrides: dict[str, Any]  # dotted keys on top of the base configuration
    model: str
    flops_per_image: float  # forward FLOPs of the generator it trains or reuses
    steps: int
    batch: int
    latents: Literal["rae", "pixels"] = "rae"
    decoder_from: str | None = None  # None: trains its own decoder; else reuses this arm's
    generator_from: str | None = None  # None: trains its own DiT; else reuses this arm's
    overfit: bool = False  # (a): single-sample overfitting instead of the pipeline stages

    @property
    def train_flops(self) -> float:
        return train_flops(self.flops_per_image, self.batch, self.steps)

    @property
    def stages(self) -> tuple[str, ...]:
        if self.overfit:
            return ()
        own = (("train-decoder",) if self.decoder_from is None else ()) + \
            (("train-generator",) if self.generator_from is None else ())
        return own + ("sample", "evaluate")

    def config(self, base: dict, seed: int) -> dict:
        """The arm's full configuration for one seed (sampling noise follows the seed too)."""
        values = {**self.overrides, "seed": seed, "sample.seed": seed}
        return apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in values.items()])


@dataclass(frozen=True)
class Claim:
    """The paper's finding on one metric: `winner` is better than `loser`."""

    ablation: str
    metric: str
    winner: str
    loser: str
    paper: str

    @property
    def better(self) -> Literal["lower", "higher"]:
        return METRICS[self.metric][1]


@dataclass(frozen=True)
class Plan:
    preset: str
    base: dict  # the validated configuration every arm starts from
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...]
    claims: tuple[Claim, ...]

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def _schedule(cfg: Config, steps: int) -> dict[str, Any]:
    """The DiT's step counts with warmup and decay at the preset's fractions of training; one
    checkpoint and preview grid at the end (no FID curve: evaluate scores the final model)."""
    d = cfg.generator
    return {"generator.steps": steps, "generator.warmup_steps": round(d.warmup_steps * steps / d.steps),
            "generator.decay_start_step": round(d.decay_start_step * steps / d.steps),
            "generator.ckpt_every": steps, "generator.sample_every": steps}


def make_plan(cfg: Config) -> Plan:
    """Every arm of every ablation for this configuration, validated, with matched compute."""
    from rae_core.models import model_flops_per_image
    from rae_core.transport import shift_factor
    from rae_core.validate import check_registries

    size = size_for(cfg.preset)
    base = apply_overrides(cfg.to_dict(), [
        f"tracking.experiment={cfg.tracking.experiment}-ablation",
        f"sample.num_per_class={size.num_per_class}", "evaluate.curve_per_class=0"])
    rae_c, grid, _ = latent_shape(cfg)
    pix_c = latent_shape(cfg, "pixels")[0]
    batch = cfg.generator.batch_size
    dh = cfg.generator.model
    dh_flops = model_flops_per_image(dh, rae_c, grid, **cfg.generator.overrides())
    budget = train_flops(dh_flops, batch, size.dit_steps)
    shift = shift_factor(grid * grid, rae_c, cfg.generator.shift_base)

    wide = {"hidden": size.dit_hidden}
    wide["depth"] = matched_depth(size.dit_model, rae_c, grid, dh_flops, **wide)
    dit_flops = model_flops_per_image(size.dit_model, rae_c, grid, **wide)
    pix_flops = model_flops_per_image(size.dit_model, pix_c, grid, **wide)
    dit_steps = matched_steps(budget, dit_flops, batch)
    pix_steps = matched_steps(budget, pix_flops, batch)
    plain = {"generator.model": size.dit_model, "generator.hidden": size.dit_hidden,
             "generator.depth": wide["depth"], "generator.heads": None}
    dit_label = f"{size.dit_model} (hidden {size.dit_hidden}, depth {wide['depth']})"

    lane = {"ray.cpus_per_worker": max(1, cfg.ray.cpus_per_worker // LANES)}
    reference = {"generator.shift": None, "decoder.noise_tau": 0.8, **lane,
                 **_schedule(cfg, size.dit_steps)}
    arms = [
        Arm("reference", "bcd", f"{dh}, time shift s = {shift:.3g}, decoder noise tau 0.8, "
            "RAE latents", reference, dh, dh_flops, size.dit_steps, batch),
        Arm("no-shift", "b", f"{dh} with shift s = 1 (none)", {**reference, "generator.shift": 1.0},
            dh, dh_flops, size.dit_steps, batch, decoder_from="reference"),
        Arm("plain-decoder", "c", "decoder without noise augmentation (tau 0), "
            "the reference arm's DiT", {**reference, "decoder.noise_tau": 0.0}, dh, dh_flops,
            size.dit_steps, batch, generator_from="reference"),
        Arm("dit", "de", f"{dit_label} on RAE latents, FLOPs of the reference",
            {**reference, **plain, **_schedule(cfg, dit_steps)}, size.dit_model, dit_flops,
            dit_steps, batch, decoder_from="reference"),
        # The pixel "decoder" only has to learn un-patchifying: no noise augmentation.
        Arm("pixels", "e", f"{dit_label} on pixels ({pix_c} channels), FLOPs of the reference",
            {**reference, **plain, **_schedule(cfg, pix_steps), "encoder.name": "pixels",
             "decoder.noise_tau": 0.0}, size.dit_model, pix_flops, pix_steps, batch,
            latents="pixels"),
    ]
    ref_width = max(size.widths)
    ob = size.overfit_batch
    w_flops = {w: model_flops_per_image(size.dit_model, rae_c, grid, hidden=w)
               for w in size.widths}
    for w in size.widths:
        steps = matched_steps(train_flops(w_flops[ref_width], ob, size.overfit_steps),
                              w_flops[w], ob)
        rel = "<" if w < rae_c else ("=" if w == rae_c else ">")
        arms.append(Arm(f"width-{w}", "a", f"{size.dit_model} hidden {w} {rel} {rae_c} latent "
                        "channels, fit to one latent",
                        {"generator.model": size.dit_model, "generator.hidden": w, "generator.depth": None,
                         "generator.heads": None, "generator.shift": None}, size.dit_model, w_flops[w],
                        steps, ob, overfit=True))
    seeds = tuple(cfg.seed + i for i in range(size.seeds))
    for arm in arms:
        arm_cfg = from_dict(arm.config(base, seeds[0]))
        if not arm.overfit:  # (a) builds narrow models on purpose
            check_registries(arm_cfg)
    return Plan(cfg.preset, base, seeds, tuple(arms), claims(size, rae_c))


def claims(size: AblationSize, channels: int) -> tuple[Claim, ...]:
    narrow = [w for w in size.widths if w < channels]
    wide = [w for w in size.widths if w >= channels]
    out = [Claim("a", "overfit_loss", f"width-{w}", f"width-{n}",
                 f"hidden {n} < {channels} channels cannot fit one sample; {w} >= {channels} "
                 "can (paper: DiT-S, 384 < 768 channels, stays at high loss)")
           for n in narrow for w in wide]
    for metric in ("fid", "class_accuracy"):
        implied = "" if metric == "fid" else " (implied by better samples)"
        out += [
            Claim("b", metric, "reference", "no-shift",
                  f"the shift (s = 6.93 at 256 px) improves samples: gFID 23.08 -> 4.81"
                  f"{implied}"),
            Claim("c", metric, "reference", "plain-decoder",
                  f"noise augmentation improves samples: gFID 4.81 -> 4.28{implied}"),
            Claim("d", metric, "reference", "dit",
                  f"DiT-DH converges faster and better: gFID 4.28 (DiT-XL) -> 2.16 "
                  f"(DiTDH-XL), 80 epochs{implied}"),
            Claim("e", metric, "dit", "pixels",
                  f"diffusion in RAE latents beats diffusion in pixels{implied}"),
        ]
    out += [Claim("c", "rfid", "plain-decoder", "reference",
                  "noise augmentation costs reconstruction: rFID 0.49 -> 0.57"),
            Claim("c", "recon_psnr", "plain-decoder", "reference",
                  "noise augmentation costs reconstruction (implied by rFID)")]
    return tuple(sorted(out, key=lambda c: c.ablation))


# ---------------------------------------------------------------------------------------------
# (a) single-sample overfitting


def overfit_one_latent(cfg: Config, paths: Paths, steps: int, batch: int) -> dict:
    """Fit the configured DiT to ONE training latent (fresh noise and time for each of `batch`
    copies at every step) and measure how far the loss falls.

    The score is the loss after training on 1024 fixed (noise, time) draws; a model that has
    memorised the latent predicts every velocity exactly, so a wide one approaches zero.
    """
    from rae_core.autoencoder import load_encoder, load_stats, stats_identity
    from rae_core.data.latents import ShardSource
    from rae_core.generator import latent_shift
    from rae_core.models import build_model
    from rae_core.train.common import set_lr, warmup_constant_linear
    from rae_core.transport import Transport

    d = cfg.generator
    encoder = load_encoder(cfg, paths)
    stats = load_stats(cfg, paths, encoder)
    source = ShardSource(paths.latents_dir, stats, stats_identity(cfg, encoder), hflip=False)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = source.get(torch.tensor([0]), gen)
    shape = tuple(encoder.latent_shape)
    torch.manual_seed(cfg.seed)
    model = build_model(d.model, in_channels=shape[0], grid_size=shape[1],
                        num_classes=cfg.data.num_classes, label_dropout=0.0, allow_narrow=True,
                        **d.overrides())
    transport = Transport(time_dist=d.time_dist, shift=latent_shift(cfg, shape))
    opt = torch.optim.AdamW(model.parameters(), lr=d.lr, betas=tuple(d.betas), weight_decay=0.0)
    xb, yb = x.expand(batch, *shape), y.expand(batch)
    curve = []
    for step in range(steps):
        noise = torch.randn(xb.shape, generator=gen)
        t = transport.sample_time(batch, generator=gen)
        loss = transport.loss(model, xb, yb, noise=noise, t=t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), d.grad_clip or float("inf"))
        set_lr(opt, warmup_constant_linear(step, d.lr, d.min_lr, round(0.05 * steps),
                                           steps // 2, steps))
        opt.step()
        if (step + 1) % 10 == 0 or step + 1 == steps:
            curve.append((step + 1, loss.item()))
    model.eval()
    g = torch.Generator().manual_seed(10_000 + cfg.seed)  # the same draws for every width
    n = 1024
    with torch.no_grad():
        final = transport.loss(model, x.expand(n, *shape), y.expand(n),
                               noise=torch.randn((n, *shape), generator=g),
                               t=transport.sample_time(n, generator=g))
    return {"overfit_loss": float(final), "steps": steps, "curve": curve,
            "params": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------
# Verdicts and the report


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


def _number(metric: str, value: float, run_id: str) -> dict:
    return {"metric": metric, "value": float(value), "run_id": run_id}


def build_report(plan: Plan, results: dict[str, dict[int, dict[str, dict]]], parent_run_id: str,
                 extractor: str, wall_s: float) -> dict:
    """The report as data. `results[arm][seed][metric]` = {"value", "run_id"} of the run that
    logged it; means and spreads are logged to the parent run under the keys named here."""
    arms = {}
    for arm in plan.arms:
        first = results[arm.name][plan.seeds[0]]
        arms[arm.name] = {
            "description": arm.description, "ablations": arm.ablations, "model": arm.model,
            "runs": {str(s): results[arm.name][s]["steps"]["run_id"] for s in plan.seeds},
            **{k: _number(k, first[k]["value"], first[k]["run_id"])
               for k in ("steps", "train_flops")}}
    rows = []
    for c in plan.claims:
        values, summary = {}, {}
        for name in (c.winner, c.loser):
            values[name] = [{"seed": s, **_number(c.metric, results[name][s][c.metric]["value"],
                                                   results[name][s][c.metric]["run_id"])}
                            for s in plan.seeds]
            mean, sd = spread([v["value"] for v in values[name]])
            key = f"{c.ablation}.{name}.{c.metric}"
            summary[name] = {"mean": _number(f"{key}.mean", mean, parent_run_id),
                             "sd": None if sd is None else _number(f"{key}.sd", sd,
                                                                   parent_run_id)}
        by_seed = {n: {v["seed"]: v["value"] for v in values[n]} for n in values}
        rows.append({"ablation": c.ablation, "title": ABLATIONS[c.ablation],
                     "metric": c.metric, "better": c.better, "paper": c.paper,
                     "winner": c.winner, "loser": c.loser, "values": values,
                     "summary": summary,
                     "verdict": verdict(by_seed[c.winner], by_seed[c.loser], c.better)})
    return {"preset": plan.preset, "parent_run_id": parent_run_id,
            "experiment": plan.base["tracking"]["experiment"], "extractor": extractor,
            "seeds": list(plan.seeds), "arms": arms, "claims": rows,
            "wall_s": _number("ablate.wall_s", wall_s, parent_run_id)}


def parent_metrics(report: dict) -> dict[str, float]:
    """The numbers of the report that belong to the parent run (means, spreads, wall time)."""
    out = {report["wall_s"]["metric"]: report["wall_s"]["value"]}
    for row in report["claims"]:
        for s in row["summary"].values():
            for n in (s["mean"], s["sd"]):
                if n is not None:
                    out[n["metric"]] = n["value"]
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def _cell(row: dict, arm: str) -> str:
    s = row["summary"][arm]
    if s["sd"] is None:
        return f"{arm}: **{_fmt(s['mean']['value'])}**"
    seeds = ", ".join(_fmt(v["value"]) for v in row["values"][arm])
    return f"{arm}: **{_fmt(s['mean']['value'])}** ± {_fmt(s['sd']['value'])} ({seeds})"


def render_markdown(report: dict) -> str:
    """report.md: the verdict table, then what every arm is and what it cost."""
    ext = report["extractor"]
    lines = [f"# RAE ablations, preset `{report['preset']}`", "",
             f"Seeds {', '.join(map(str, report['seeds']))}; with several seeds, values are mean "
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
        lines.append(f"| {r['ablation']} | {r['title']} | {label} {arrow} | {r['paper']} | "
                     f"{_cell(r, r['winner'])} | {_cell(r, r['loser'])} | {r['verdict']} |")
    lines += ["", "## Arms", "", "| arm | ablations | what | steps | training FLOPs |",
              "|---|---|---|---|---|"]
    for name, a in report["arms"].items():
        lines.append(f"| {name} | {', '.join(a['ablations'])} | {a['description']} | "
                     f"{a['steps']['value']:.0f} | {a['train_flops']['value']:.3e} |")
    lines += ["", "Training FLOPs = 3 x forward FLOPs per image x batch x steps of the generator "
              "(rae_core.models.model_flops_per_image); arms of one ablation are matched to "
              "the same budget by steps (and, for the plain DiT, depth).", "",
              f"Wall time: {report['wall_s']['value'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_ablation(report: dict, letter: str, path: Path) -> Path:
    """A bar chart per metric of one ablation: the mean per arm, each seed as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["claims"] if r["ablation"] == letter]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    order = list(dict.fromkeys(a for r in rows for a in (r["winner"], r["loser"])))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), dpi=110,
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        per_arm = {}
        for r in rows:
            if r["metric"] == metric:
                for arm in (r["winner"], r["loser"]):
                    per_arm[arm] = [v["value"] for v in r["values"][arm]]
        names = [a for a in order if a in per_arm]
        ax.bar(range(len(names)), [statistics.fmean(per_arm[n]) for n in names],
               color="#9ab", edgecolor="#345")
        for i, n in enumerate(names):
            ax.scatter([i] * len(per_arm[n]), per_arm[n], color="#c33", s=14, zorder=3)
        label, better = METRICS[metric]
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{label} ({'lower' if better == 'lower' else 'higher'} is better)",
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"({letter}) {ABLATIONS[letter]}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path

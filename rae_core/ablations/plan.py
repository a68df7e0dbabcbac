"""What an ablation run is made of: roots of shared latents, arms, the paper's claims, and the plan
that selects them for a preset and a set of ablation letters.

An arm is a configuration override run once per seed; it shares what it does not change with
others: the stages of its root (dataset, encoder, statistics, latents, perhaps a decoder) and
the decoder or generator of another arm. A claim is the paper's finding on one metric between
two arms. Which arms run follows from the claims of the selected ablations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rae_core.ablations.compute import train_flops
from rae_core.config import Config, apply_overrides
from rae_core.errors import ConfigError

METRICS: dict[str, tuple[str, Literal["lower", "higher"]]] = {
    "overfit_loss": ("final loss on one latent", "lower"),
    "fid": ("FID", "lower"),
    "class_accuracy": ("class accuracy", "higher"),
    "rfid": ("rFID", "lower"),
    "recon_psnr": ("reconstruction PSNR", "higher"),
    "rfid_discrete": ("rFID of the discrete tokens alone", "lower"),
    "recon_psnr_discrete": ("PSNR of the discrete tokens alone", "higher"),
    "images_per_s": ("images/s", "higher"),
}

# Arms run side by side in this many lanes, each Ray Train worker with its share of the CPUs:
# small arms spend most of their time starting Ray Train workers, which then overlaps.
LANES = 2


@dataclass(frozen=True)
class Scale:
    """What every ablation of a preset shares: seeds and the samples that score an arm."""

    seeds: int  # seeds per arm: cfg.seed, cfg.seed + 1, ...
    num_per_class: int  # samples per class for FID and class accuracy


SCALES: dict[str, Scale] = {
    "smoke": Scale(seeds=1, num_per_class=8),
    "tiny": Scale(seeds=3, num_per_class=40),
}


def sized(table: dict[str, Any], preset: str) -> Any:
    """The entry of a table of sizes for this preset; a preset without one is refused."""
    if preset not in table:
        raise ConfigError(f"preset {preset!r} has no ablation sizes "
                          f"(valid: {', '.join(table)}); see rae_core/ablations")
    return table[preset]


def lane(cfg: Config) -> dict[str, Any]:
    """The overrides that give an arm its lane's share of the CPUs."""
    return {"ray.cpus_per_worker": max(1, cfg.ray.cpus_per_worker // LANES)}


@dataclass(frozen=True)
class Root:
    """A project root runs/ablate/<preset>/<name>/ whose stages the arms on its latents share."""

    name: str
    stages: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys on top of the base
    base: Root | None = None  # the root whose outputs it links before running its stages

    @property
    def has_decoder(self) -> bool:
        return "train-decoder" in self.stages

    @property
    def depth(self) -> int:
        """How many roots it builds on: roots of the same depth can run side by side."""
        return 0 if self.base is None else self.base.depth + 1

    @property
    def settings(self) -> dict[str, Any]:
        """Its overrides on top of those of the root it links."""
        return {**(self.base.settings if self.base else {}), **self.overrides}

    def config(self, base: dict) -> dict:
        return apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in self.settings.items()])


# The dataset and the yardstick every arm is scored with: every plan starts with it.
DATASET = Root("dataset", ("prepare",))
# The configured encoder's latents (RAE): the root of most arms.
SHARED = Root("shared", ("pretrain-encoder", "stats", "extract"), base=DATASET)


@dataclass(frozen=True)
class Arm:
    """One configuration of the ablation, run once per seed in runs/ablate/<preset>/<name>-s<seed>."""

    name: str
    description: str
    overrides: dict[str, Any]  # dotted keys on top of its root's configuration
    model: str
    flops_per_image: float  # forward FLOPs of the generator it trains or reuses
    steps: int
    batch: int
    root: Root = SHARED
    decoder_from: str | None = None  # the arm whose decoder it reuses; None: its root's or its own
    generator_from: str | None = None  # the arm whose generator it reuses; None: trains its own
    overfit: bool = False  # (a): single-sample overfitting instead of the pipeline stages

    @property
    def train_flops(self) -> float:
        return train_flops(self.flops_per_image, self.batch, self.steps)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(s for s in (self.decoder_from, self.generator_from) if s)

    @property
    def stages(self) -> tuple[str, ...]:
        if self.overfit:
            return ()
        own_decoder = self.decoder_from is None and not self.root.has_decoder
        own = (("train-decoder",) if own_decoder else ()) + \
            (("train-generator",) if self.generator_from is None else ())
        return own + ("sample", "evaluate")

    def config(self, base: dict, seed: int) -> dict:
        """The arm's full configuration for one seed (sampling noise follows the seed too)."""
        values = {**self.root.settings, **self.overrides, "seed": seed, "sample.seed": seed}
        return apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in values.items()])


@dataclass(frozen=True)
class Claim:
    """The paper's finding on one metric: `winner` is better than `loser`."""

    ablation: str
    metric: str
    winner: str
    loser: str
    paper: str
    case: str = ""  # which regime of the ablation, where it has several
    # the loser's number where it is another measure of the same quantity (g: the rFID of the
    # tokens alone against the winner's rFID of the hybrid latent); None: `metric`
    loser_metric: str | None = None

    def __post_init__(self) -> None:
        if METRICS[self.loser_key][1] != self.better:
            raise ValueError(f"claim on {self.metric}: {self.loser_key} is not better in the "
                             "same direction")

    @property
    def better(self) -> Literal["lower", "higher"]:
        return METRICS[self.metric][1]

    @property
    def loser_key(self) -> str:
        return self.loser_metric or self.metric


@dataclass(frozen=True)
class AblationSet:
    """Ablations defined together in one module: their titles, the arms and claims they build
    for a configuration, and any tables of their own in the report:
    tables(plan, results, report, parent_run_id) -> [{"ablation", "title", "columns", "rows",
    "note"}], each cell a string, a number or an arm's summary over seeds (rae_core.ablations
    .report)."""

    titles: dict[str, str]
    design: Callable[[Config], tuple[list[Arm], list[Claim]]]
    tables: Callable[..., list[dict]] | None = None


@dataclass(frozen=True)
class Plan:
    preset: str
    base: dict  # the validated configuration every arm starts from
    seeds: tuple[int, ...]
    letters: tuple[str, ...]  # the ablations it runs
    titles: dict[str, str]
    arms: tuple[Arm, ...]  # sources before the arms that reuse them
    claims: tuple[Claim, ...]
    served: dict[str, str]  # arm -> the letters it serves (as a claim's arm or a source)
    tables: tuple[Callable[..., list[dict]], ...] = ()

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def root_serves(self, root: Root) -> str:
        """The letters of the arms on this root or on roots built on it."""
        def on(r: Root | None) -> bool:
            return r is not None and (r.name == root.name or on(r.base))

        return "".join(sorted({x for a in self.arms if on(a.root) for x in self.served[a.name]}))

    @property
    def roots(self) -> tuple[Root, ...]:
        """The arms' roots and those they build on, shallowest first: the dataset's root, then
        each root after its base."""
        found: dict[str, Root] = {}
        for arm in self.arms:
            root = arm.root
            while root is not None:
                found.setdefault(root.name, root)
                root = root.base
        return tuple(sorted(found.values(), key=lambda r: r.depth))


def select(arms: list[Arm], claims: list[Claim], letters: tuple[str, ...]
           ) -> tuple[tuple[Arm, ...], tuple[Claim, ...], dict[str, str]]:
    """The claims of `letters`, the arms they compare plus those arms' sources, and the letters
    each arm serves."""
    by_name = {a.name: a for a in arms}
    picked = tuple(c for c in claims if c.ablation in letters)
    served: dict[str, set[str]] = {}
    for c in picked:
        for name in (c.winner, c.loser):
            served.setdefault(name, set()).add(c.ablation)
    todo = list(served)
    while todo:
        arm = by_name[todo.pop()]
        for source in arm.sources:
            if not served.get(source, set()) >= served[arm.name]:
                served.setdefault(source, set()).update(served[arm.name])
                todo.append(source)
    chosen = tuple(a for a in arms if a.name in served)
    return chosen, picked, {a.name: "".join(sorted(served[a.name])) for a in chosen}

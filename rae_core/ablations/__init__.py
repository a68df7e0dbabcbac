"""The paper's key ablations at small scale, as a plan of arms at matched compute and a report
built from measured numbers.

Each module of ablations (rae: a-e on the paper's own recipe; latents: f, RAE vs VAE latents;
hart: g, HART's hybrid tokens and residual head, and its speed against RAE) is an AblationSet
registered below: titles, a design(cfg) -> (arms, claims) and, optionally, tables of its own.
The generic parts are the plan (plan.py), compute matching (compute.py), the report (report.py)
and its figures (plots.py); the flow (flows/ablate.py) runs the stages and tracks them.
"""

from __future__ import annotations

from rae_core.ablations import hart, latents, rae
from rae_core.ablations.plan import SCALES, AblationSet, Arm, Plan, select, sized
from rae_core.config import Config, apply_overrides, from_dict
from rae_core.errors import ConfigError

SETS: tuple[AblationSet, ...] = (rae.ABLATIONS, latents.ABLATIONS, hart.ABLATIONS)
TITLES: dict[str, str] = {k: v for s in SETS for k, v in s.titles.items()}


def parse_only(text: str | None) -> tuple[str, ...]:
    """`--only d,f` -> ("d", "f"); None -> every ablation."""
    if text is None:
        return tuple(TITLES)
    letters = [x.strip() for x in text.split(",") if x.strip()]
    for x in letters:
        if x not in TITLES:
            raise ConfigError(f"--only {text}: unknown ablation {x!r} "
                              f"(valid: {', '.join(TITLES)})")
    if not letters:
        raise ConfigError(f"--only {text!r}: name at least one ablation "
                          f"(valid: {', '.join(TITLES)})")
    return tuple(sorted(set(letters)))


def _once(arms: list[Arm]) -> list[Arm]:
    """Each arm once: sets may share one (g compares HART with f's RAE arm)."""
    found: dict[str, Arm] = {}
    for arm in arms:
        if found.setdefault(arm.name, arm) != arm:
            raise ValueError(f"two different arms are named {arm.name!r}")
    return list(found.values())


def make_plan(cfg: Config, letters: tuple[str, ...] | None = None) -> Plan:
    """The arms and claims of the selected ablations (all when None) for this configuration,
    with the arms they reuse, every arm's configuration validated."""
    from rae_core.validate import check_registries

    letters = tuple(TITLES) if letters is None else letters
    scale = sized(SCALES, cfg.preset)
    base = apply_overrides(cfg.to_dict(), [
        f"tracking.experiment={cfg.tracking.experiment}-ablation",
        f"sample.num_per_class={scale.num_per_class}", "evaluate.curve_per_class=0"])
    chosen = [s for s in SETS if set(s.titles) & set(letters)]
    arms, claims = [], []
    for s in chosen:
        a, c = s.design(cfg)
        arms += a
        claims += c
    arms, claims, served = select(_once(arms), claims, letters)
    tables = tuple(s.tables for s in chosen if s.tables)
    seeds = tuple(cfg.seed + i for i in range(scale.seeds))
    for arm in arms:
        arm_cfg = from_dict(arm.config(base, seeds[0]))
        if not arm.overfit:  # (a) builds narrow models on purpose
            check_registries(arm_cfg)
    return Plan(cfg.preset, base, seeds, letters, {k: TITLES[k] for k in letters}, arms,
                claims, served, tables)

"""Drift of a reproduction against its baseline: each metric within its absolute tolerance."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from rae_core.errors import RaeError


class DriftError(RaeError):
    """A reproduction's metrics moved beyond their tolerances."""


@dataclass(frozen=True)
class MetricCheck:
    metric: str
    baseline: float
    now: float
    tolerance: float

    @property
    def delta(self) -> float:
        return self.now - self.baseline

    @property
    def ok(self) -> bool:
        return math.isfinite(self.now) and abs(self.delta) <= self.tolerance


def compare(baseline: dict[str, float], now: dict[str, float],
            tolerances: dict[str, float]) -> list[MetricCheck]:
    """One check per toleranced metric that the baseline recorded; a metric missing now is NaN
    (and so drifts)."""
    return [MetricCheck(m, float(baseline[m]), float(now.get(m, math.nan)), float(tol))
            for m, tol in tolerances.items() if m in baseline]


def report_markdown(checks: list[MetricCheck], title: str) -> str:
    lines = [f"## {title}", "", "| metric | baseline | now | delta | tolerance | verdict |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c.metric} | {c.baseline:.4f} | {c.now:.4f} | {c.delta:+.4f} | "
              f"{c.tolerance:g} | {'pass' if c.ok else 'DRIFT'} |" for c in checks]
    return "\n".join(lines) + "\n"


def report_rows(checks: list[MetricCheck]) -> list[dict]:
    return [asdict(c) | {"delta": c.delta, "ok": c.ok} for c in checks]


def raise_on_drift(checks: list[MetricCheck], what: str) -> None:
    bad = [c for c in checks if not c.ok]
    if bad:
        parts = "; ".join(f"{c.metric} {c.now:.4g} vs baseline {c.baseline:.4g} "
                          f"(tolerance {c.tolerance:g})" for c in bad)
        raise DriftError(f"{what} drifted: {parts}")

"""Scheduled reproducibility runs: `rae serve` serves the nightly `smoke` and weekly `tiny`
reproductions (cron strings from params: schedule.nightly, schedule.weekly) from one process."""

from __future__ import annotations

from pathlib import Path

from rae_core.config import Config


def deployments(cfg: Config, root: Path) -> list:
    from flows.reproduce import reproduce_flow

    return [reproduce_flow.to_deployment(name=f"reproduce-{preset}", cron=cron,
                                         parameters={"preset": preset, "root": str(root)})
            for preset, cron in (("smoke", cfg.schedule.nightly), ("tiny", cfg.schedule.weekly))]


def serve(cfg: Config, root: Path) -> None:
    """Serve the deployments from this process (blocks until interrupted)."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(cfg, root))

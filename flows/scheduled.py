"""Scheduled reproducibility runs: the pipeline re-run on pinned presets on cron schedules."""

from __future__ import annotations

from pathlib import Path

from rae_core.config import Config


def serve(cfg: Config, root: Path) -> None:
    """Serve the nightly and weekly deployments from this process (blocks)."""
    from prefect import serve as prefect_serve

    from flows.pipeline import pipeline_flow
    from rae_core.presets import load_config

    deployments = []
    for preset, cron in (("smoke", cfg.schedule.nightly), ("tiny", cfg.schedule.weekly)):
        pinned = load_config(None, preset)
        deployments.append(pipeline_flow.to_deployment(
            name=f"reproduce-{preset}", cron=cron,
            parameters={"cfg_dict": pinned.to_dict(), "root": str(root)}))
    prefect_serve(*deployments)

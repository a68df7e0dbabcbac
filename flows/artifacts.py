"""Reports as Prefect artifacts, so the flow run's page in the Prefect UI shows them: the
leaderboard as a table after an evaluation, the ablation and drift reports as markdown."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LEADERBOARD_COLUMNS = ("group", "fid", "precision", "recall", "class_accuracy", "images_per_s",
                       "family", "model", "encoder", "steps", "sampler", "preset", "run_id")


def artifact_key(text: str) -> str:
    """Prefect's artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "report"


def _in_a_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def leaderboard_table(board: list[dict[str, Any]], experiment: str) -> str | None:
    """The experiment's leaderboard (best first within each group) as a table artifact."""
    if not _in_a_run():
        return None
    from prefect.artifacts import create_table_artifact

    table = [{c: r.get(c, "") for c in LEADERBOARD_COLUMNS} for r in board]
    return str(create_table_artifact(table, key=artifact_key(f"leaderboard-{experiment}"),
                                     description=f"FID leaderboard of MLflow experiment "
                                                 f"`{experiment}`"))


def markdown_report(path: Path, key: str, description: str) -> str | None:
    """A markdown report file as an artifact of the flow run that wrote it."""
    if not _in_a_run():
        return None
    from prefect.artifacts import create_markdown_artifact

    return str(create_markdown_artifact(path.read_text(), key=artifact_key(key),
                                        description=description))

"""After `rae run` in a DVC project, the outputs it made are recorded in dvc.lock (and DVC's
cache) as `dvc repro` would have recorded them, so that `dvc push` shares them and `dvc status`
knows them. Only where the run's configuration is params.yaml's: dvc.lock pairs each stage's
outputs with the params DVC reads from that file, and a run of other params would pair them
with values that did not make them.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from rae_core.config import Config

log = logging.getLogger(__name__)


def is_dvc_project(root: Path) -> bool:
    return (root / "dvc.yaml").is_file() and (root / ".dvc").is_dir()


def record(cfg: Config, root: Path, stages: list[str]) -> str | None:
    """`dvc commit` of `stages`: a line that says what was recorded, or why not; None outside a
    DVC project."""
    if not is_dvc_project(root) or not stages:
        return None
    from flows.cli import venv_tool
    from rae_core.presets import load_config

    params = root / "params.yaml"
    try:
        same = params.is_file() and load_config(str(params), None, []).to_dict() == cfg.to_dict()
    except Exception:  # noqa: BLE001 - an unreadable params.yaml: the run's params are not its
        same = False
    if not same:
        return ("dvc.lock: not updated, this run's parameters are not params.yaml's "
                "(`rae params` with the same --preset/--set writes them there)")
    res = subprocess.run([venv_tool("dvc"), "commit", "--force", "--quiet", *stages], cwd=root,
                         capture_output=True, text=True)
    if res.returncode:
        reason = (res.stderr.strip().splitlines() or ["dvc commit failed"])[-1]
        log.warning("dvc commit %s: %s", " ".join(stages), res.stderr.strip())
        return f"dvc.lock: not updated ({reason})"
    return f"dvc.lock: recorded the outputs of {len(stages)} stages (`dvc push` shares them)"

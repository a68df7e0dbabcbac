"""Process environment the platform needs before Prefect, Ray or MLflow are imported."""

from __future__ import annotations

import os
from pathlib import Path


def configure(root: Path) -> None:
    """Project-local state and telemetry off; anything already set in the environment wins."""
    defaults = {
        # OpenMP threads that spin while waiting starve each other (and Ray, Prefect, MLflow)
        # on a small machine: elementwise ops ran 100x slower on 2 busy cores.
        "OMP_WAIT_POLICY": "PASSIVE",
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_V2_ENABLED": "1",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "TORCH_HOME": str(Path.home() / ".cache" / "torch"),
        "GIT_PYTHON_REFRESH": "quiet",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)

"""Process environment the platform needs before Prefect, Ray or MLflow are imported."""

from __future__ import annotations

import os
from pathlib import Path


def project_home(root: Path) -> Path:
    """Where the project keeps its tracking store and Prefect home: `root`, except inside the
    temporary copy that `dvc exp run --temp/--queue` runs in (<project>/.dvc/tmp/exps/...),
    whose runs must land in the project's own store, not in a folder deleted afterwards."""
    root = Path(root).resolve()
    for p in root.parents:
        if p.name == "exps" and p.parent.name == "tmp" and p.parent.parent.name == ".dvc":
            return p.parent.parent.parent
    return root


def configure(root: Path) -> None:
    """Project-local state and telemetry off; anything already set in the environment wins."""
    home = project_home(root)
    defaults = {
        # OpenMP threads that spin while waiting starve each other (and Ray, Prefect, MLflow)
        # on a small machine: elementwise ops ran 100x slower on 2 busy cores.
        "OMP_WAIT_POLICY": "PASSIVE",
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        # a quiet console, and the stages' own logs in the Prefect run's logs
        "PREFECT_LOGGING_SETTINGS_PATH": str(Path(__file__).with_name("logging.yml")),
        "PREFECT_LOGGING_EXTRA_LOGGERS": "rae_core,flows",
        # MLflow's INFO chatter and its bars for the artifacts it reads back as it logs a model
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # flows/tracking.retrying retries within RAE_TRACKING_RETRY_S; MLflow's own 7 retries
        # would hold every call to a dead server for minutes
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        # how long a stage's shared Prefect server and Ray head outlive their last user
        # (flows/services.py); 0 starts them per process instead
        "RAE_SERVICES_IDLE_S": "120",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_V2_ENABLED": "1",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "TORCH_HOME": str(Path.home() / ".cache" / "torch"),
        "GIT_PYTHON_REFRESH": "quiet",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The digits image folder, materialised once for the session."""
    from rae_core.data.digits import materialise_digits

    root = tmp_path_factory.mktemp("digits") / "dataset"
    materialise_digits(root, val_fraction=0.2, seed=0)
    return root

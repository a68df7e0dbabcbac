import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from flows.services import free_port  # noqa: E402
from rae_core.device import torch_threads  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of this test process for a module's tests (never a cluster or a project's head
    that the environment names), shut down after them."""
    import ray

    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAE_LOCAL_RAY") if k in os.environ}
    yield
    ray.shutdown()
    os.environ.update(saved)


@pytest.fixture
def one_thread():
    """Torch on one thread for a test of small tensors, where threads only add overhead."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The digits image folder, materialised once for the session."""
    from rae_core.data.digits import materialise_digits

    root = tmp_path_factory.mktemp("digits") / "dataset"
    materialise_digits(root, val_fraction=0.2, seed=0)
    return root

BIN = Path(sys.executable).parent
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}


def git(cwd: Path, *args: str) -> str:
    """A git command in `cwd` with a test identity (commits need one); its stripped stdout."""
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_IDENTITY},
                          check=True, capture_output=True, text=True, timeout=30).stdout.strip()


def constraint_pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}; every line must be one `name==version`."""
    from packaging.utils import canonicalize_name

    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: `{line}` is not a `name==version` pin"
            key = canonicalize_name(name.strip())
            assert key not in out, f"constraints.txt pins {name} twice"
            out[key] = version.strip()
    return out


def http_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def mlflow_server_command(home: Path, port: int) -> list[str]:
    """A tracking server with a store of its own under `home` (SQLite + an artifacts folder)."""
    return [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Team mode: a Ray head, a Prefect server and an MLflow server (SQLite + an artifacts
    folder) as separate processes on loopback, stopped at the end of the session."""
    home = tmp_path_factory.mktemp("team")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS"):
        env.pop(key, None)
    ray_port, prefect_port, mlflow_port = free_port(), free_port(), free_port()
    commands = {
        "ray": [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                f"--port={ray_port}", "--num-cpus=2", "--include-dashboard=false",
                f"--temp-dir={home / 'ray'}"],
        "prefect": [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                    "--port", str(prefect_port)],
        "mlflow": mlflow_server_command(home, mlflow_port),
    }
    procs = {}
    try:
        for name, cmd in commands.items():
            log = home / f"{name}.log"
            procs[name] = (subprocess.Popen(cmd, env=env, stdout=open(log, "w"),
                                            stderr=subprocess.STDOUT, start_new_session=True),
                           log)
        prefect_url, mlflow_url = (f"http://127.0.0.1:{prefect_port}/api",
                                   f"http://127.0.0.1:{mlflow_port}")
        _wait(f"{prefect_url}/health", *procs["prefect"])
        _wait(f"{mlflow_url}/health", *procs["mlflow"])
        _wait_for_ray(f"127.0.0.1:{ray_port}", env, *procs["ray"])
        yield {"env": {**env, "RAY_ADDRESS": f"127.0.0.1:{ray_port}",
                       "PREFECT_API_URL": prefect_url, "MLFLOW_TRACKING_URI": mlflow_url},
               "prefect": prefect_url, "mlflow": mlflow_url, "home": home}
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_for_ray(address: str, env: dict, proc: subprocess.Popen, log: Path) -> None:
    code = f"import ray; ray.init(address='{address}'); print(ray.cluster_resources()['CPU'])"
    end = time.time() + 120
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"ray head exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        if res.returncode == 0:
            return
        time.sleep(2)
    pytest.fail(f"ray head at {address} did not answer:\n{log.read_text()[-2000:]}")


@pytest.fixture
def local_mlflow(tmp_path, monkeypatch):
    """A SQLite MLflow store of the test's own; the process-wide tracking URI (which another
    test may have pointed at a server) is restored afterwards."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield mlflow
    mlflow.set_tracking_uri(previous)

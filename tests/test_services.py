"""The Prefect server and Ray head that `rae stage` processes share (flows/services.py): a second
stage joins what the first left, a dead record is replaced, and both stop once idle. The tests
share one project and run in order; the services live only seconds after the last one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import services
from flows.env import configure, project_home

BIN = Path(sys.executable).parent
IDLE_S = 90  # above a stage's start-up before it attaches, even on busy cores
# attach first: the imports after it take long on busy cores, and the services count as idle
ATTACH = ("import json, os; from pathlib import Path; from flows import services; "
          "from rae_core.presets import load_config; cfg = load_config('params.yaml', None, []); "
          "services.attach('stage', Path.cwd(), cfg); "
          "import ray; from rae_core.train.runner import ensure_ray; ensure_ray(cfg); "
          "print(json.dumps({'prefect': os.environ['PREFECT_API_URL'], "
          "'ray_port': ray.get_runtime_context().gcs_address.rsplit(':', 1)[1]}))")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("services")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "RAY_ADDRESS", "RAE_LOCAL_RAY", "PREFECT_HOME",
                        "MLFLOW_TRACKING_URI")}
    env.update(RAE_SERVICES_IDLE_S=str(IDLE_S), PATH=f"{BIN}{os.pathsep}{env['PATH']}",
               PREFECT_HOME=str(root / ".prefect"), RAY_AUTH_MODE="disabled")
    subprocess.run([BIN / "rae", "params", "--preset", "smoke"], cwd=root, env=env, check=True,
                   capture_output=True)
    yield root, env
    services.stop_all(root / ".prefect")  # whatever a failed test left running


def _run(cmd: list, root: Path, env: dict) -> tuple[float, str]:
    t0 = time.time()
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{cmd[:3]}: {res.stdout[-1500:]}\n{res.stderr[-1500:]}"
    return time.time() - t0, res.stdout


def test_a_dvc_temporary_experiment_uses_the_projects_store_and_checkpoints(tmp_path,
                                                                           monkeypatch):
    proj = (tmp_path / "proj").resolve()
    copy = proj / ".dvc" / "tmp" / "exps" / "tmpk2j5"  # where `dvc exp run --temp` runs
    copy.mkdir(parents=True)
    assert project_home(copy) == project_home(proj) == proj
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("MLFLOW_TRACKING_URI", "PREFECT_HOME")})
    configure(copy)
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{proj / 'mlflow.db'}"
    assert os.environ["PREFECT_HOME"] == str(proj / ".prefect")
    services.share_checkpoints(copy)
    (copy / "runs" / "checkpoints" / "train-generator-abc").mkdir()
    assert (proj / "runs" / "checkpoints" / "train-generator-abc").is_dir()


def _port(rec: dict) -> str:
    """Ray names its GCS by the node's address, whichever address the driver dialled."""
    return rec["ray"]["address"].rsplit(":", 1)[1]


def test_a_second_stage_joins_the_services_the_first_left(project):
    root, env = project
    _run([BIN / "rae", "stage", "prepare"], root, env)
    first = services.read(root / ".prefect")
    _, out = _run([sys.executable, "-c", ATTACH], root, env)
    second = services.read(root / ".prefect")
    assert {n: second[n] for n in ("prefect", "ray", "watchdog")} == \
        {n: first[n] for n in ("prefect", "ray", "watchdog")}
    joined = json.loads(out.strip().splitlines()[-1])
    assert joined == {"prefect": first["prefect"]["url"], "ray_port": _port(first)}


def test_a_record_of_killed_services_is_replaced(project):
    root, env = project
    old = services.read(root / ".prefect")
    for name in ("prefect", "ray"):
        os.killpg(old[name]["pid"], signal.SIGKILL)
    _, out = _run([sys.executable, "-c", ATTACH], root, env)
    new = services.read(root / ".prefect")
    assert new["prefect"]["pid"] != old["prefect"]["pid"]
    assert new["ray"]["pid"] != old["ray"]["pid"]
    assert all(services.answers(n, new[n]) for n in ("prefect", "ray"))
    assert json.loads(out.strip().splitlines()[-1]) == \
        {"prefect": new["prefect"]["url"], "ray_port": _port(new)}


WARM = ATTACH.split("print(")[0] + (
    "import sys; from rae_core.train.runner import STAGE_MODULES, warm_workers; "
    "warm = ray.get(warm_workers(cfg)); "
    "probe = ray.remote(num_cpus=1)(lambda: (os.getpid(), set(STAGE_MODULES) <= sys.modules.keys())); "
    "print(json.dumps({'warm': warm, 'probes': ray.get([probe.remote() for _ in range(4)])}))")


def test_warmed_workers_serve_the_stages_tasks_with_their_code_imported(project):
    root, env = project
    out = json.loads(_run([sys.executable, "-c", WARM], root, env)[1].splitlines()[-1])
    assert len(set(out["warm"])) == 2  # two workers: train-decoder runs beside the others
    for pid, imported in out["probes"]:
        assert pid in out["warm"] and imported


def test_the_services_stop_after_the_idle_timeout(project):
    root, env = project
    short = {**env, "RAE_SERVICES_IDLE_S": "3"}  # the latest user's timeout applies
    _run([sys.executable, "-c", ATTACH.split("import ray;")[0]], root, short)
    rec = services.read(root / ".prefect")
    assert rec["idle_s"] == 3
    pids = [rec[n]["pid"] for n in services.RECORDED if n in rec]
    deadline = time.time() + 3 + 30
    while time.time() < deadline and any(services._group_alive(p) for p in pids):
        time.sleep(0.5)
    assert not any(services._group_alive(p) for p in pids)
    assert not (root / ".prefect" / services.RECORD).exists()


def test_a_server_port_is_free_and_outside_the_range_port_zero_draws_from(monkeypatch):
    """A port freed after binding port 0 can go to the next process that binds port 0 (a Ray
    head opens a dozen) before its server starts: server ports come from elsewhere."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {services.free_port() for _ in range(20)}
    assert all(p in services.SERVER_PORTS and p < low for p in ports)
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", services.free_port()))
        taken = held.getsockname()[1]
        held.listen()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", taken + 1))  # free now, else the case below is not the one
        monkeypatch.setattr(services, "SERVER_PORTS", range(taken, taken + 2))
        assert {services.free_port() for _ in range(5)} == {taken + 1}
        monkeypatch.setattr(services, "SERVER_PORTS", range(taken, taken + 1))
        with pytest.raises(services.RaeError, match=f"no free loopback port in {taken}-{taken}"):
            services.free_port()

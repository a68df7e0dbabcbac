"""The project's driver (flows/driver.py): the `rae stage` commands of a project run in one
long-lived process that receives each command's terminal, environment and argv. The tests share
one project and run in order. Which process ran a command is read from the project's lock file,
where every `rae run`/`rae stage` writes its own pid."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import driver, services

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("driver")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "RAY_ADDRESS", "RAE_LOCAL_RAY", "PREFECT_HOME",
                        "MLFLOW_TRACKING_URI", "RAE_DRIVER")}
    env.update(RAE_SERVICES_IDLE_S="90", PATH=f"{BIN}{os.pathsep}{env['PATH']}",
               PREFECT_HOME=str(root / ".prefect"), RAY_AUTH_MODE="disabled")
    subprocess.run([BIN / "rae", "params", "--preset", "smoke"], cwd=root, env=env, check=True,
                   capture_output=True)
    yield root, env
    services.stop_all(root / ".prefect")


def _rae(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "rae", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def _driver_pid(root: Path) -> int:
    return services.read(root / ".prefect")["driver"]["pid"]


def _holder(root: Path) -> int:
    """The pid of the process that ran the project's last command."""
    return int(re.search(r"\(pid (\d+)\)", (root / "runs" / ".lock").read_text()).group(1))


def _wait_for(condition, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_the_identity_follows_import_time_settings_only(monkeypatch, tmp_path):
    base = driver.identity(tmp_path)
    monkeypatch.setenv("RAE_T0", "123")  # a command's own start time
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")  # applied per command
    assert driver.identity(tmp_path) == base
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert driver.identity(tmp_path) != base
    assert driver.identity(tmp_path / "other") != driver.identity(tmp_path)


def test_stages_run_in_one_driver_with_the_callers_terminal(project):
    root, env = project
    first = _rae(root, env, "stage", "prepare")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "✓ prepare" in first.stdout  # the driver wrote to this process's stdout
    pid = _driver_pid(root)
    assert _holder(root) == pid
    again = _rae(root, env, "stage", "prepare", "--force")
    assert again.returncode == 0 and "✓ prepare" in again.stdout
    assert _driver_pid(root) == pid == _holder(root)
    assert services._pid_alive(pid)


def test_each_command_in_the_driver_reads_the_checkouts_git_state_afresh(project):
    import mlflow

    root, env = project
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]

    def commit_of_last_prepare() -> str:
        client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.`mlflow.runName` = 'prepare'",
                                  order_by=["attributes.start_time DESC"])
        return runs[0].data.tags["mlflow.source.git.commit"]

    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    heads = []
    for message in ("first", "second"):  # a commit between two commands of one driver
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", message], check=True)
        heads.append(subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip())
        res = _rae(root, env, "stage", "prepare", "--force")
        assert res.returncode == 0, res.stderr[-2000:]
        assert _holder(root) == _driver_pid(root)
        assert commit_of_last_prepare() == heads[-1]
    assert heads[0] != heads[1]
    shutil.rmtree(root / ".git")


def test_a_failing_command_keeps_its_exit_code_and_its_one_line(project):
    root, env = project
    pid = _driver_pid(root)
    res = _rae(root, env, "stage", "stats", "--set", "stats.shards=0")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("rae: error: stats.shards")
    assert _driver_pid(root) == pid and services._pid_alive(pid)  # it serves the next one


def test_without_the_driver_a_command_runs_in_its_own_process(project):
    root, env = project
    proc = subprocess.Popen([BIN / "rae", "stage", "prepare", "--force"], cwd=root,
                            env={**env, "RAE_DRIVER": "0"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert _holder(root) == proc.pid


def test_a_changed_setting_starts_a_new_driver_and_the_old_one_ends(project):
    root, env = project
    old = _driver_pid(root)
    res = _rae(root, {**env, "RAE_TRACKING_RETRY_S": "59"}, "stage", "prepare")
    assert res.returncode == 0, res.stderr[-2000:]
    new = _driver_pid(root)
    assert new != old and _holder(root) == new
    _wait_for(lambda: not services._pid_alive(old), 30)
    env["RAE_TRACKING_RETRY_S"] = "59"  # the later tests use the new driver


def _start_pretraining(root: Path, env: dict) -> subprocess.Popen:
    """`rae stage pretrain-encoder --force` through the driver, returned once it is running
    (from step 0: a finished run's checkpoint would end it at once)."""
    for ckpt in (root / "runs" / "checkpoints").glob("pretrain-encoder-*"):
        shutil.rmtree(ckpt)
    (root / "runs" / ".lock").write_text("")
    proc = subprocess.Popen([BIN / "rae", "stage", "pretrain-encoder", "--force"], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: "pretrain-encoder" in (root / "runs" / ".lock").read_text())
    return proc


def test_a_command_sent_to_a_busy_driver_meets_the_projects_lock(project):
    root, env = project
    proc = _start_pretraining(root, env)
    beside = _rae(root, env, "stage", "prepare", "--force")
    assert beside.returncode == 1
    assert "is writing this project's outputs" in beside.stderr
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "✓ pretrain-encoder" in out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_stopped_caller_stops_its_command_and_the_driver(project, sig):
    root, env = project
    proc = _start_pretraining(root, env)
    pid = _driver_pid(root)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    if sig == signal.SIGINT:  # relayed to the driver, whose command ends as interrupted
        assert proc.returncode == 130
    _wait_for(lambda: not services._pid_alive(pid), 60)
    res = _rae(root, env, "stage", "prepare", "--force")  # a new driver takes over
    assert res.returncode == 0, res.stderr[-2000:]
    assert _driver_pid(root) != pid


def _reply_after_head(tmp_path: Path, head_answers_first: bool, watch_ray: bool = True):
    """`_await_reply` of a driver that never answers, while the recorded Ray head (a listener
    of the test's own) answers, if `head_answers_first`, then stops; with the driver's process
    (a sleeping stand-in in its own session) and the reply."""
    import socket
    import threading

    head = socket.socket()
    head.bind(("127.0.0.1", services.free_port()))
    head.listen()
    address = "{}:{}".format(*head.getsockname())
    if not head_answers_first:
        head.close()
    home = tmp_path / ".prefect"
    home.mkdir()
    stand_in = subprocess.Popen(["sleep", "60"], start_new_session=True)
    services._write(home, {"ray": {"address": address, "pid": stand_in.pid}})
    threading.Timer(0.5, head.close).start()
    ours, theirs = socket.socketpair()
    # a reply long after the head's loss is meant to be noticed, so a watch that misses it fails
    late = threading.Timer(2.0 if not watch_ray or not head_answers_first else 8.0,
                           theirs.sendall, [b'{"rc": 0}\n'])
    late.start()
    with ours, theirs:
        reply = driver._await_reply(ours, {"pid": stand_in.pid}, home, watch_ray,
                                    poll_s=0.1, grace_s=0.5)
        late.cancel()
    return stand_in, reply, address


def test_a_stuck_driver_whose_ray_head_died_is_ended_by_its_caller(tmp_path, capsys):
    stand_in, reply, address = _reply_after_head(tmp_path, head_answers_first=True)
    assert reply == {"rc": 1}
    assert stand_in.wait(timeout=10) == -signal.SIGKILL
    assert capsys.readouterr().err.strip() == services.ray_head_lost_line(address)


@pytest.mark.parametrize("case", ["booting head", "not watched"])
def test_a_head_that_never_answered_or_is_not_the_commands_leaves_the_driver_be(tmp_path,
                                                                                 capsys, case):
    stand_in, reply, _ = _reply_after_head(tmp_path, head_answers_first=case != "booting head",
                                           watch_ray=case != "not watched")
    try:
        assert reply == {"rc": 0} and stand_in.poll() is None
        assert capsys.readouterr().err == ""
    finally:
        stand_in.kill()
        stand_in.wait()

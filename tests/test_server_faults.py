"""Tracking and orchestration servers that fail mid-run: transient tracking errors are retried
with bounded backoff, what a server that stays down did not get is journaled under runs/tracking/
and `rae sync` logs it into the same run, once. The end-to-end test SIGKILLs a real MLflow server
on loopback during a training stage."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import _wait, mlflow_server_command

from flows import journal, services, tracking
from rae_core.paths import Paths
from rae_core.presets import load_config

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _server_up():
    tracking._down.clear()
    tracking._journals.clear()
    yield
    tracking._down.clear()
    tracking._journals.clear()


def _flaky(failures: int, error: Exception):
    calls = []

    def fn(x):
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise error
        return x * 2
    return fn, calls


def test_transient_errors_are_retried_with_growing_waits_within_the_budget():
    fn, calls = _flaky(2, ConnectionError("refused"))
    assert tracking.retrying(fn, 21, budget_s=5) == 42
    waits = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert len(calls) == 3 and 0.45 < waits[0] < waits[1] < 1.5  # 0.5 s, then 1 s

    fn, calls = _flaky(99, ConnectionError("refused"))
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        tracking.retrying(fn, 1, budget_s=2)
    assert time.monotonic() - t0 < 2.5 and len(calls) == 3  # 0.5 + 1 s; 2 s more is past it
    fn, calls = _flaky(99, ConnectionError("refused"))  # known down: one try, no waiting
    with pytest.raises(ConnectionError):
        tracking.retrying(fn, 1, budget_s=10)
    assert len(calls) == 1

    fn, calls = _flaky(1, ValueError("a bug"))  # not transient: raised at once
    with pytest.raises(ValueError):
        tracking.retrying(fn, 1, budget_s=10)
    assert len(calls) == 1


def test_mlflow_wrapped_connection_errors_are_transient():
    from mlflow.exceptions import MlflowException

    assert tracking.transient(MlflowException("API request to http://x/api failed with "
                                              "exception HTTPConnectionPool(...)"))
    assert not tracking.transient(MlflowException("Invalid value for param"))


def test_calls_a_down_server_missed_are_journaled_and_synced_once(tmp_path, local_mlflow,
                                                                  monkeypatch):
    monkeypatch.setenv("RAE_TRACKING_RETRY_S", "0.2")
    cfg = load_config(None, "smoke", [])
    run_id = tracking.start_run(cfg, tmp_path, "train-generator")
    log = Paths.at(tmp_path).metrics_log("train-generator")
    real = tracking.OPS.copy()
    down = {k: (lambda *a, **kw: (_ for _ in ()).throw(ConnectionError("refused")))
            for k in real}
    monkeypatch.setattr(tracking, "OPS", down)
    monkeypatch.setattr(tracking, "_log", down["log"])
    with tracking.MetricsForwarder(run_id, log, interval=0.1):
        with open(log, "a") as f:
            for step in range(1, 6):
                f.write(f'{{"step": {step}, "time": {time.time()}, "metrics": '
                        f'{{"loss": {1 / step}}}}}\n')
    tracking.log_numbers(run_id, {"final_loss": 0.2, "model": "DiT"}, prefix="stage.")
    tracking.end_run(run_id)
    line = tracking.unlogged_line()
    assert f"run {run_id} (train-generator): 5 metric lines, 1 metric, 1 tag" in line
    assert line.endswith("`rae sync` logs it once the server answers")
    assert (journal.folder(tmp_path) / f"{run_id}.json").exists()

    monkeypatch.setattr(tracking, "OPS", real)
    monkeypatch.setattr(tracking, "_log", real["log"])
    tracking._down.clear()
    (done,) = tracking.sync(tmp_path)
    assert done.startswith(f"logged run {run_id} (train-generator): 5 metric lines")
    history = tracking.client().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    run = tracking.client().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage.model"] == "DiT"
    assert tracking.sync(tmp_path) == ["nothing to log: every run is complete in MLflow"]
    assert len(tracking.client().get_metric_history(run_id, "loss")) == 5
    assert not list(journal.folder(tmp_path).glob(f"{run_id}*"))


def test_a_run_made_while_the_server_was_down_is_created_by_sync(tmp_path, local_mlflow,
                                                                 monkeypatch):
    monkeypatch.setenv("RAE_TRACKING_RETRY_S", "0.2")
    cfg = load_config(None, "smoke", [])
    real_create = tracking._create
    monkeypatch.setattr(tracking, "_create", lambda *a, **kw: (_ for _ in ()).throw(
        ConnectionError("refused")))
    parent = tracking.start_run(cfg, tmp_path, "pipeline-smoke")
    child = tracking.start_run(cfg, tmp_path, "sample", parent=parent)
    assert journal.is_offline(parent) and journal.is_offline(child)
    tracking.log_numbers(child, {"images": 80})
    tracking.end_run(child)
    tracking.end_run(parent)
    monkeypatch.setattr(tracking, "_create", real_create)
    tracking._down.clear()
    assert len(tracking.sync(tmp_path)) == 2
    runs = {r.data.tags["mlflow.runName"]: r for r in
            local_mlflow.search_runs(experiment_names=["rae"], output_format="list")}
    assert runs["sample"].data.tags["mlflow.parentRunId"] == runs["pipeline-smoke"].info.run_id
    assert runs["sample"].data.metrics["images"] == 80
    assert tracking.sync(tmp_path) == ["nothing to log: every run is complete in MLflow"]


def _start_mlflow(home: Path, port: int, env: dict) -> subprocess.Popen:
    home.mkdir(exist_ok=True)
    log = home / "mlflow.log"
    proc = subprocess.Popen(mlflow_server_command(home, port), env=env, stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    _wait(f"http://127.0.0.1:{port}/health", proc, log)
    return proc


def test_a_stage_outlives_a_killed_tracking_server_and_sync_logs_the_rest(tmp_path, digits_root):
    """SIGKILL the MLflow server once a training stage's first metrics reached it; the stage
    finishes on its own, says in one line what was not logged, and `rae sync` against the
    restarted server logs it into the same run, once."""
    from mlflow.tracking import MlflowClient

    port, home = services.free_port(), tmp_path / "mlflow"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "RAY_ADDRESS", "PREFECT_HOME", "RAE_LOCAL_RAY")}
    env.update(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", RAE_TRACKING_RETRY_S="3",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", RAE_SERVICES_IDLE_S="0",
               PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    server = _start_mlflow(home, port, env)
    proj = tmp_path / "project"
    (proj / "data").mkdir(parents=True)
    (proj / "data" / "dataset").symlink_to(digits_root, target_is_directory=True)
    cmd = [str(BIN / "rae"), "stage", "pretrain-encoder", "--preset", "smoke",
           "--set", "encoder.pretrain.steps=150", "--set", "encoder.pretrain.ckpt_every=10"]
    stage = subprocess.Popen(cmd, cwd=proj, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    try:
        end, run_id = time.time() + 240, None
        while time.time() < end and run_id is None:
            time.sleep(0.5)
            runs = client.search_runs(["1"], "tags.`rae.stage` = 'pretrain-encoder'") \
                if client.get_experiment_by_name("rae") else []
            if runs and client.get_metric_history(runs[0].info.run_id, "mae_loss"):
                run_id = runs[0].info.run_id
        assert run_id, "no metrics reached the server"
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        out, err = stage.communicate(timeout=300)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 0, err[-2000:]
    assert (proj / "models" / "encoder" / "encoder.pt").exists()  # the outputs are made
    (line,) = [ln for ln in out.splitlines() if "not logged" in ln]
    assert f"run {run_id} (pretrain-encoder): " in line and "metric lines" in line
    assert "`rae sync`" in line

    server = _start_mlflow(home, port, env)
    try:
        synced = subprocess.run([str(BIN / "rae"), "sync"], cwd=proj, env=env,
                                capture_output=True, text=True, timeout=120)
        assert synced.returncode == 0, synced.stderr[-2000:]
        assert f"logged run {run_id} (pretrain-encoder)" in synced.stdout
        steps = [m.step for m in client.get_metric_history(run_id, "mae_loss")]
        assert sorted(set(steps)) == sorted(steps) and max(steps) == 150
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and "stage.wall_s" in run.data.metrics
        again = subprocess.run([str(BIN / "rae"), "sync"], cwd=proj, env=env,
                               capture_output=True, text=True, timeout=120)
        assert "nothing to log" in again.stdout
        assert len(client.get_metric_history(run_id, "mae_loss")) == len(steps)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _project(tmp_path: Path, digits_root: Path, **settings: str) -> tuple[Path, dict]:
    """A project on the digits whose `rae` commands share a Prefect server and Ray head of their
    own (.prefect/services.json) and track into its mlflow.db."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "RAY_ADDRESS", "PREFECT_HOME", "RAE_LOCAL_RAY",
                        "MLFLOW_TRACKING_URI")}
    env.update(RAE_SERVICES_IDLE_S="30", PATH=f"{BIN}{os.pathsep}{env['PATH']}", **settings)
    proj = tmp_path / "project"
    (proj / "data").mkdir(parents=True)
    (proj / "data" / "dataset").symlink_to(digits_root, target_is_directory=True)
    return proj, env


def _start_until_checkpoint(cmd: list[str], proj: Path, env: dict, stage: str):
    """`cmd` started in `proj`, returned once `stage` has written its first checkpoint."""
    proc = subprocess.Popen(cmd, cwd=proj, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    end = time.time() + 300
    while time.time() < end and not list((proj / "runs" / "checkpoints").glob(
            f"{stage}-*/last.pt")):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    return proc


def test_a_killed_ray_head_ends_the_stage_in_one_line_and_the_rerun_resumes(tmp_path, digits_root):
    """SIGKILL the project's Ray head once a training stage has checkpointed: the stage stops
    within seconds, in one line, and the same command again resumes from the checkpoint, in the
    same MLflow run."""
    import json
    import sqlite3

    cmd = [str(BIN / "rae"), "stage", "pretrain-encoder", "--preset", "smoke",
           "--set", "encoder.pretrain.steps=150", "--set", "encoder.pretrain.ckpt_every=10"]
    proj, env = _project(tmp_path, digits_root)
    home = proj / ".prefect"
    try:
        stage = _start_until_checkpoint(cmd, proj, env, "pretrain-encoder")
        os.killpg(services.read(home)["ray"]["pid"], signal.SIGKILL)
        killed = time.time()
        _, err = stage.communicate(timeout=120)
        assert time.time() - killed < 30, err[-2000:]  # Ray's own client would wait a minute
        assert stage.returncode == 1
        last = err.strip().splitlines()[-1]
        assert re.fullmatch(r"rae: error: the Ray head at [\d.]+:\d+ stopped answering during "
                            r"the run; .* run the same command again to resume from them",
                            last), err[-2000:]

        again = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        log = (proj / "runs" / "logs" / "pretrain-encoder.jsonl").read_text()
        resumed = [r["step"] for r in map(json.loads, log.splitlines())
                   if r.get("event", "").startswith("resumed at step")]
        assert resumed and resumed[0] >= 10
        with sqlite3.connect(proj / "mlflow.db") as db:
            runs = db.execute("SELECT r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid"
                              " WHERE t.key = 'rae.stage' AND t.value = 'pretrain-encoder'"
                              ).fetchall()
        assert runs == [("FINISHED",)]  # one curve: the first attempt's run, continued
    finally:
        services.stop_all(home)


def test_a_killed_prefect_server_loses_no_finished_stage_and_the_rerun_resumes(tmp_path,
                                                                               digits_root):
    """SIGKILL the project's Prefect server while a stage trains: the run ends in one line
    naming PREFECT_API_URL (or finishes: Prefect 3 keeps task state in the client), and the same
    command again skips every stage that finished and completes the rest."""
    # the client's own retries of a dead server, short (the default waits about a minute)
    proj, env = _project(tmp_path, digits_root, PREFECT_CLIENT_MAX_RETRIES="1")
    cmd = [str(BIN / "rae"), "run", "--preset", "smoke", "--until", "train-generator"]
    home = proj / ".prefect"
    try:
        run = _start_until_checkpoint(cmd, proj, env, "train-generator")
        prefect = services.read(home)["prefect"]
        os.killpg(prefect["pid"], signal.SIGKILL)
        out, err = run.communicate(timeout=300)
        if run.returncode:
            # Prefect's own complaints come first, the last without its newline
            (last,) = re.findall(r"rae: error: .*", err)
            assert re.fullmatch(
                rf"rae: error: PREFECT_API_URL={re.escape(prefect['url'])}: the Prefect server "
                r"stopped answering during the run \(\w+\); finished stages are kept, "
                r"`rae run` again resumes from them", last), err[-2000:]
        finished = {p.stem for p in (proj / "runs" / "records").glob("*.json")}
        assert {"prepare", "pretrain-encoder", "stats", "extract"} <= finished

        again = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        for name in finished:
            assert f"{name}: skipped (unchanged since" in again.stdout, again.stdout[-2000:]
        assert {p.stem for p in (proj / "runs" / "records").glob("*.json")} == {
            "prepare", "pretrain-encoder", "stats", "extract", "train-decoder", "train-generator"}
    finally:
        services.stop_all(home)

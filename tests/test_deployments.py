"""The team deployment for real: the deployments of infra/prefect/prefect.yaml registered with
a Prefect server on loopback by the commands infra/README.md gives, a process worker polling the
`cluster` queue, and the `pipeline` deployment triggered for the smoke preset against a standing
Ray head (the `servers` fixture's Prefect server and Ray head) and an MLflow server of its own
(so that its registered versions stay apart from the other end-to-end runs'). The worker's
environment names neither Ray nor MLflow: the run must get both from the deployment's job
variables. Everything is checked through the servers' own APIs."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import _wait, http_json, mlflow_server_command

from flows.services import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "infra" / "README.md"
BIN = Path(sys.executable).parent
STAGES = ["prepare", "pretrain-encoder", "stats", "extract", "train-decoder", "train-generator",
          "sample", "evaluate"]

# The walk-through's Prefect commands, run here exactly as written there.
WORK_POOL = "prefect work-pool create rae-pool --type process --overwrite"
DEPLOY = "prefect --no-prompt deploy --all --prefect-file infra/prefect/prefect.yaml"
WORKER = "prefect worker start --pool rae-pool --work-queue cluster --type process"
TRIGGER = "prefect deployment run rae-run/pipeline -p preset=smoke"
COMMANDS = (WORK_POOL, DEPLOY, WORKER, TRIGGER)
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

pytestmark = pytest.mark.e2e


def _run(cmd: str, cwd: Path, env: dict, timeout: float = 300) -> str:
    args = cmd.split()
    res = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _wait_for_flow_run(api: str, run_id: str, worker: subprocess.Popen, log: Path,
                       timeout: float = 900) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        run = http_json(f"{api}/flow_runs/{run_id}")
        if run["state_type"] in TERMINAL:
            return run
        if worker.poll() is not None:
            pytest.fail(f"the worker exited with {worker.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(3)
    pytest.fail(f"flow run {run_id} not finished within {timeout:.0f} s:\n"
                f"{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory, servers):
    home = tmp_path_factory.mktemp("tracking")
    port, log = free_port(), home / "mlflow.log"
    proc = subprocess.Popen(mlflow_server_command(home, port), env=servers["env"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/health", proc, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, servers, tracking_server):
    proj = tmp_path_factory.mktemp("cluster-project")
    for item in ("rae_core", "flows", "infra", "params.yaml"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, proj / item)
    env = {k: v for k, v in servers["env"].items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_HOME")}
    env.update(PREFECT_API_URL=servers["prefect"], PREFECT_WORKER_QUERY_SECONDS="2",
               PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
                 "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}.items():
        env.setdefault(k, v)
    for git in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "cluster checkout"]):
        subprocess.run(["git", *git], cwd=proj, env=env, check=True, capture_output=True)
    # What infra/prefect/cluster-*.env holds for a real cluster, here the loopback servers.
    ray_address = servers["env"]["RAY_ADDRESS"]
    deploy_env = {**env, "RAE_CLUSTER_RAY_ADDRESS": ray_address,
                  "RAE_CLUSTER_MLFLOW_URI": tracking_server,
                  "RAE_CLUSTER_PROJECT_DIR": str(proj)}
    _run(WORK_POOL, proj, env)
    _run(DEPLOY, proj, deploy_env)
    log = proj / "worker.log"
    worker = subprocess.Popen([str(BIN / "prefect"), *WORKER.split()[1:]], cwd=tmp_path_factory
                              .mktemp("worker"), env=env, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = _run(TRIGGER, proj, env)
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
        run = _wait_for_flow_run(servers["prefect"], run_id, worker, log)
        yield {"proj": proj, "run": run, "ray_address": ray_address, "log": log}
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


def test_the_readme_gives_exactly_the_commands_this_test_runs():
    text = README.read_text()
    for cmd in COMMANDS:
        assert cmd in text, f"infra/README.md does not give `{cmd}`"


def test_the_worker_ran_the_pipeline_deployment_to_completion(deployed, servers,
                                                             tracking_server):
    run = deployed["run"]
    assert run["state_type"] == "COMPLETED", deployed["log"].read_text()[-4000:]
    assert run["work_pool_name"] == "rae-pool" and run["work_queue_name"] == "cluster"
    assert run["infrastructure_pid"], "no worker started the flow run's process"
    assert run["parameters"]["preset"] == "smoke"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=deployed["proj"], check=True,
                            capture_output=True, text=True).stdout.strip()
    assert run["name"] == f"smoke@{commit[:12]}"  # named after preset and code revision
    dep = http_json(f"{servers['prefect']}/deployments/{run['deployment_id']}")
    assert dep["name"] == "pipeline" and dep["entrypoint"] == "flows/pipeline.py:run_flow"
    # `prefect deploy` filled the job variables in from the environment it ran in.
    assert dep["job_variables"]["env"] == {"RAY_ADDRESS": deployed["ray_address"],
                                           "MLFLOW_TRACKING_URI": tracking_server,
                                           "RAE_PROJECT_DIR": str(deployed["proj"])}
    # The run worked in the project directory the job variables named.
    assert (deployed["proj"] / "runs" / "evaluate" / "metrics.json").is_file()


def test_the_scheduled_deployments_are_registered_on_the_reproduce_queue(deployed, servers):
    deps = http_json(f"{servers['prefect']}/deployments/filter", {})
    by_name = {d["name"]: d for d in deps}
    crons = {name: [s["schedule"]["cron"] for s in by_name[name]["schedules"]]
             for name in ("reproduce-smoke", "reproduce-tiny")}
    assert crons == {"reproduce-smoke": ["0 3 * * *"], "reproduce-tiny": ["0 4 * * 0"]}
    for name in crons:
        assert by_name[name]["work_queue_name"] == "reproduce"
        assert by_name[name]["job_variables"]["env"]["RAY_ADDRESS"] == "local"


def test_every_stage_logged_to_the_tracking_server_and_ran_on_the_standing_ray(
        deployed, tracking_server):
    api = f"{tracking_server}/api/2.0/mlflow"
    exp = http_json(f"{api}/experiments/get-by-name?experiment_name=rae")["experiment"]
    runs = http_json(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                            "max_results": 500})["runs"]
    port = deployed["ray_address"].rsplit(":", 1)[1]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    stages = {t["rae.stage"]: (r, t) for r, t in zip(runs, tags, strict=True) if "rae.stage" in t}
    assert len(stages) == len(runs) - 1  # and the pipeline's parent run
    assert sorted(stages) == sorted(STAGES)
    for name, (run, tag) in stages.items():
        assert run["info"]["status"] == "FINISHED", name
        # The GCS the stage's driver joined; Ray reports it under the node's own address, so
        # the port identifies the standing head (evaluate's tags carry no prefix).
        cluster = tag.get("stage.ray_cluster", tag.get("ray_cluster"))
        if name == "prepare":  # validates files in the driver before any Ray work
            assert cluster is None or cluster.endswith(f":{port}")
        else:
            assert cluster and cluster.endswith(f":{port}"), (name, cluster)
    metrics = {m["key"]: m["value"] for m in stages["evaluate"][0]["data"]["metrics"]}
    assert metrics["fid"] > 0 and 0 <= metrics["class_accuracy"] <= 1
    models = {m["name"] for m in
              http_json(f"{api}/registered-models/search")["registered_models"]}
    assert {"rae-decoder-digits-32", "rae-generator-digits-32"} <= models

"""The smoke preset end to end, in team mode: `dvc repro` runs every stage through `rae stage`,
i.e. through Prefect, Ray Train and MLflow, against a Ray head, a Prefect server and an MLflow
server running as separate processes on loopback (the `servers` fixture). The tests check the
artifacts, DVC's view, and what the servers' own HTTP APIs hold; the crash test runs one stage
in local mode (temporary Prefect server, local Ray, SQLite MLflow in the project)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import http_json

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "pretrain-encoder", "stats", "extract", "train-decoder", "train-generator",
          "sample", "evaluate"]

pytestmark = pytest.mark.e2e


def _run(cmd, cwd, env, timeout=900):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def project(tmp_path_factory, servers):
    proj = tmp_path_factory.mktemp("project")
    for item in ("dvc.yaml", "rae_core", "flows"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, proj / item)
    env = dict(servers["env"])
    env.pop("PREFECT_HOME", None)  # the project's own, where a temporary server would live
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
                 "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}.items():
        env.setdefault(k, v)
    _run(["git", "init", "-q"], proj, env)
    _run(["dvc", "init", "-q"], proj, env)
    _run([sys.executable, "-m", "flows.cli", "params", "--preset", "smoke",
          "--set", "generator.keep_snapshots=2"], proj, env)
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "smoke project"], proj, env)
    repro = _run(["dvc", "repro"], proj, env)
    return proj, env, repro


def _mlflow(env):
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow


def test_every_stage_ran_and_wrote_its_outputs(project):
    proj, _, repro = project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in repro.stdout
    assert len(list((proj / "data" / "dataset" / "train").glob("*/*.png"))) > 1000
    assert (proj / "models" / "encoder" / "encoder.pt").exists()
    assert (proj / "models" / "stats" / "stats.pt").exists()
    manifest = json.loads((proj / "data" / "latents" / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 2
    assert (proj / "models" / "decoder" / "decoder.pt").exists()
    assert (proj / "models" / "generator" / "ema.pt").exists()
    # generator.keep_snapshots=2 of the snapshots at steps 20, 40, 60: the first and the last,
    # and the FID curve over those
    snaps = sorted(p.name for p in (proj / "runs" / "checkpoints").glob(
        "train-generator-*/ema-step*.pt"))
    assert snaps == ["ema-step0000020.pt", "ema-step0000060.pt"]
    curve = json.loads((proj / "runs" / "evaluate" / "fid_curve.json").read_text())
    assert [c["step"] for c in curve] == [20, 60]
    assert (proj / "runs" / "samples" / "grid.png").exists()
    samples = __import__("numpy").load(proj / "runs" / "samples" / "samples.npz")
    assert samples["arr_0"].shape == (80, 32, 32, 3)
    assert sorted(set(samples["arr_1"].tolist())) == list(range(10))


def test_evaluation_metrics_are_real_numbers(project):
    proj, env, _ = project
    m = json.loads((proj / "runs" / "evaluate" / "metrics.json").read_text())
    assert m["fid"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert m["extractor"].startswith("domain")
    assert 0 <= m["class_accuracy"] <= 1 and m["recon_psnr"] > 5
    shown = _run(["dvc", "metrics", "show", "--json"], proj, env).stdout
    assert "fid" in shown


def test_mlflow_has_a_run_per_stage_with_metrics_and_models(project):
    proj, env, _ = project
    assert not (proj / "mlflow.db").exists()  # everything went to the team's server
    mlflow = _mlflow(env)
    runs = mlflow.search_runs(experiment_names=["rae"], output_format="list")
    by_stage = {r.data.tags.get("rae.stage"): r for r in runs}
    assert set(STAGES) <= set(by_stage)
    assert all(r.info.status == "FINISHED" for r in runs)
    client = mlflow.tracking.MlflowClient()
    dit_run = by_stage["train-generator"].info.run_id
    losses = client.get_metric_history(dit_run, "loss")
    assert len(losses) >= 3 and all(m.value == m.value for m in losses)
    assert by_stage["train-generator"].data.params["generator.model"] == "DiTDH-micro"
    dec_hist = client.get_metric_history(by_stage["train-decoder"].info.run_id, "l1")
    assert len(dec_hist) >= 2
    arts = [a.path for a in client.list_artifacts(by_stage["train-decoder"].info.run_id,
                                                  "images")]
    assert any("reconstructions" in a for a in arts)
    names = {m.name for m in client.search_registered_models()}
    assert {"rae-decoder-digits-32", "rae-generator-digits-32"} <= names
    champ = client.get_model_version_by_alias("rae-generator-digits-32", "champion")
    assert str(champ.version) == "1"


def test_rae_runs_lists_the_dvc_repro_as_one_pipeline_run_of_its_stages(project):
    """DVC runs each stage as its own `rae stage`: one pipeline run still groups the eight, so
    `rae runs` and `rae compare` see a `dvc repro` as they see a `rae run`."""
    proj, env, _ = project
    out = _run([sys.executable, "-m", "flows.cli", "runs", "--format", "json"], proj, env).stdout
    runs = [r for r in json.loads(out) if r["runner"] == "dvc repro"]
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED" and runs[0]["preset"] == "smoke"
    fid = json.loads((proj / "runs" / "evaluate" / "metrics.json").read_text())["fid"]
    assert runs[0]["fid"] == pytest.approx(fid)
    mlflow = _mlflow(env)
    children = mlflow.search_runs(experiment_names=["rae"], output_format="list",
                                  filter_string="tags.`mlflow.parentRunId` = "
                                                f"'{runs[0]['run_id']}'")
    assert sorted(r.data.tags["rae.stage"] for r in children) == sorted(STAGES)


def test_the_prefect_server_recorded_every_stage_flow_run(project, servers):
    proj, _, _ = project
    api = servers["prefect"]
    flows = {f["id"]: f["name"] for f in http_json(f"{api}/flows/filter", {})}
    runs = [r for r in http_json(f"{api}/flow_runs/filter", {"limit": 100})
            if flows[r["flow_id"]] == "rae-stage"]
    assert len(runs) == len(STAGES) and all(r["state_type"] == "COMPLETED" for r in runs)
    ids = [r["id"] for r in runs]
    tasks = http_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": ids}}})
    assert {t["name"].rsplit("-", 1)[0] for t in tasks} == set(STAGES)
    assert not (proj / ".prefect" / "prefect.db").exists()  # no temporary local server


def test_runs_after_prepare_name_the_dataset_with_its_dvc_digest(project):
    import yaml

    proj, env, _ = project
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    (md5,) = [o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/dataset"]
    runs = _mlflow(env).search_runs(experiment_names=["rae"], output_format="list",
                                    filter_string="tags.`rae.stage` = 'train-generator'")
    (ds,) = [d.dataset for d in runs[0].inputs.dataset_inputs]
    assert (ds.name, ds.digest, ds.source_type) == ("digits", md5, "local")


def test_the_evaluation_left_the_leaderboard_as_a_prefect_table(project, servers):
    """The latest version of the key (other tests on the same server evaluate too)."""
    arts = http_json(f"{servers['prefect']}/artifacts/filter",
                     {"artifacts": {"key": {"any_": ["leaderboard-rae"]}}, "sort": "CREATED_DESC"})
    art = arts[0]
    assert art["type"] == "table"
    table = json.loads(art["data"]) if isinstance(art["data"], str) else art["data"]
    assert table and all(r["fid"] > 0 for r in table)
    for group in {r["group"] for r in table}:  # best first within each group
        fids = [r["fid"] for r in table if r["group"] == group]
        assert fids == sorted(fids)
    assert any(r["model"] == "DiTDH-micro" and r["preset"] == "smoke" for r in table)


def test_the_mlflow_server_api_serves_the_models_and_the_champion(project, servers):
    api = f"{servers['mlflow']}/api/2.0/mlflow"
    exp = http_json(f"{api}/experiments/get-by-name?experiment_name=rae")["experiment"]
    runs = http_json(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                            "max_results": 100})["runs"]
    stages = {t["value"] for r in runs for t in r["data"].get("tags", [])
              if t["key"] == "rae.stage"}
    assert stages == set(STAGES)
    models = {m["name"] for m in
              http_json(f"{api}/registered-models/search")["registered_models"]}
    assert {"rae-decoder-digits-32", "rae-generator-digits-32"} <= models
    alias = http_json(f"{api}/registered-models/alias?name=rae-generator-digits-32"
                      "&alias=champion")
    assert str(alias["model_version"]["version"]) == "1"
    assert any((servers["home"] / "artifacts").rglob("grid.png"))


def test_leaderboard_lists_the_evaluation(project):
    proj, env, _ = project
    out = _run([sys.executable, "-m", "flows.cli", "leaderboard", "--format", "json"],
               proj, env).stdout
    board = json.loads(out)
    assert len(board) == 1
    (rows,) = board.values()
    assert rows[0]["model"] == "DiTDH-micro" and rows[0]["fid"] > 0


def test_dvc_reruns_only_what_changed(project):
    proj, env, _ = project
    status = _run(["dvc", "status", "--json"], proj, env).stdout
    assert json.loads(status) == {}
    original = (proj / "params.yaml").read_text()
    params = original.replace("steps: 10\n", "steps: 6\n", 1)
    assert "steps: 6" in params
    (proj / "params.yaml").write_text(params)
    try:
        changed = json.loads(_run(["dvc", "status", "--json"], proj, env).stdout)
    finally:
        (proj / "params.yaml").write_text(original)
    assert set(changed) == {"sample"}  # evaluate follows once the samples change


def test_a_second_run_skips_every_finished_stage_and_tracks_nothing_new(project, servers):
    """After `dvc repro`, `rae run` on the same params finds every stage's record matching:
    it says so per stage and starts nothing: no flow run, no model version, no MLflow run."""
    proj, env, _ = project
    mlflow = _mlflow(env)
    c = mlflow.tracking.MlflowClient()

    def counts():
        versions = sum(len(c.search_model_versions(f"name = '{m.name}'"))
                       for m in c.search_registered_models())
        flow_runs = http_json(f"{servers['prefect']}/flow_runs/filter", {"limit": 200})
        return versions, len(mlflow.search_runs(experiment_names=["rae"], output_format="list")
                             ), len(flow_runs)

    before = counts()
    out = _run([sys.executable, "-m", "flows.cli", "run"], proj, env).stdout
    lines = [ln for ln in out.splitlines() if ": skipped (unchanged since" in ln]
    assert [ln.split(":")[0] for ln in lines] == STAGES
    assert "nothing to run" in out
    assert counts() == before
    record = json.loads((proj / "runs" / "records" / "evaluate.json").read_text())
    assert record["outputs"]["fid"] > 0 and record["params"]["evaluate.extractor"]


def test_rae_run_records_its_outputs_in_dvc_lock(project):
    """`rae run` in a DVC project leaves dvc.lock as `dvc repro` would: every stage's outputs
    recorded, so `dvc status` finds nothing to do and `dvc push` would share them."""
    import yaml

    proj, env, _ = project
    (proj / "dvc.lock").unlink()
    out = _run([sys.executable, "-m", "flows.cli", "run", "--force", "sample"], proj, env).stdout
    assert "dvc.lock: recorded the outputs of 8 stages" in out
    assert set(yaml.safe_load((proj / "dvc.lock").read_text())["stages"]) == set(STAGES)
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], proj, env).stdout


def test_samples_do_not_depend_on_the_batch_size(project):
    """Each shard draws its noise from its own seed, so re-batching gives the same images."""
    import numpy as np

    proj, env, _ = project
    before = np.load(proj / "runs" / "samples" / "samples.npz")["arr_0"]
    _run([sys.executable, "-m", "flows.cli", "stage", "sample", "--set", "sample.batch_size=16"],
         proj, env)
    after = np.load(proj / "runs" / "samples" / "samples.npz")["arr_0"]
    assert before.shape == after.shape
    assert (before.astype(int) - after.astype(int)).__abs__().max() <= 1
    assert (before == after).mean() > 0.999


def test_a_killed_ray_worker_is_replaced_and_training_resumes_exactly(project):
    """RAE_KILL_AT SIGKILLs the Ray Train worker right after its step-40 checkpoint; Ray's
    failure handling starts a new one, which resumes at step 40 and ends on the same weights."""
    import torch

    proj, team_env, _ = project
    env = {k: v for k, v in team_env.items()
           if k not in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    before = torch.load(proj / "models" / "generator" / "ema.pt", weights_only=True)
    for d in [*(proj / "runs" / "checkpoints").glob("train-generator-*"),
              *(proj / "runs" / "ray").glob("train-generator-*")]:
        shutil.rmtree(d)
    _run([sys.executable, "-m", "flows.cli", "stage", "train-generator", "--force"], proj,
         {**env, "RAE_KILL_AT": "train-generator:40"})
    events = [json.loads(ln).get("event") for ln in
              (proj / "runs" / "logs" / "train-generator.jsonl").read_text().splitlines()]
    assert "resumed at step 40" in events
    (ckpt_dir,) = (proj / "runs" / "checkpoints").glob("train-generator-*")
    assert (ckpt_dir / ".killed-train-generator-40").exists()
    after = torch.load(proj / "models" / "generator" / "ema.pt", weights_only=True)
    assert after["step"] == before["step"] == 60
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert (proj / "mlflow.db").exists()  # local mode: the project's own SQLite store


@pytest.fixture(scope="module")
def vae_project(tmp_path_factory, servers, project):
    """The VAE family (smoke-vae: a slim AutoencoderKL pretrained here, DiT/2 by IDDPM
    diffusion) through the same dvc repro, against the same servers as the RAE run."""
    _, env, _ = project
    proj = tmp_path_factory.mktemp("vae-project")
    for item in ("dvc.yaml", "rae_core", "flows"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, proj / item)
    _run(["git", "init", "-q"], proj, env)
    _run(["dvc", "init", "-q"], proj, env)
    _run([sys.executable, "-m", "flows.cli", "params", "--preset", "smoke-vae"], proj, env)
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "smoke-vae project"], proj, env)
    repro = _run(["dvc", "repro"], proj, env)
    return proj, env, repro


def test_the_vae_family_runs_every_stage_as_a_kind_of_the_same_pipeline(vae_project):
    import numpy as np

    proj, env, repro = vae_project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in repro.stdout
    assert (proj / "models" / "encoder" / "vae" / "config.json").exists()
    ema = __import__("torch").load(proj / "models" / "generator" / "ema.pt", weights_only=True)
    assert ema["name"] == "DiT-micro/2"
    samples = np.load(proj / "runs" / "samples" / "samples.npz")
    assert samples["arr_0"].shape == (80, 32, 32, 3)
    m = json.loads((proj / "runs" / "evaluate" / "metrics.json").read_text())
    # in-test baseline: the VAE reconstructs validation digits better than their mean image does
    val = np.stack([np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB"),
                               dtype=np.float64) / 255
                    for p in sorted((proj / "data" / "dataset" / "val").glob("*/*.png"))])
    mean_psnr = float(np.mean(-10 * np.log10(((val - val.mean(0)) ** 2).mean((1, 2, 3)))))
    assert m["recon_psnr"] > mean_psnr + 3
    assert json.loads(_run(["dvc", "status", "--json"], proj, env).stdout) == {}


def test_both_families_share_one_leaderboard_with_a_family_column(vae_project):
    proj, env, _ = vae_project
    out = _run([sys.executable, "-m", "flows.cli", "leaderboard", "--format", "json"],
               proj, env).stdout
    board = json.loads(out)
    assert len(board) == 1  # same extractor, reference set and sample count: ranked together
    (rows,) = board.values()
    assert {r["family"] for r in rows} >= {"rae/flow", "vae/ddpm"}
    assert [r["fid"] for r in rows] == sorted(r["fid"] for r in rows)
    client = _mlflow(env).tracking.MlflowClient()
    names = {m.name for m in client.search_registered_models()}
    assert {"vae-decoder-digits-32", "vae-generator-digits-32"} <= names
    champ = client.get_model_version_by_alias("vae-generator-digits-32", "champion")
    assert str(champ.version) == "1"


@pytest.fixture(scope="module")
def hart_project(tmp_path_factory, servers, project):
    """The HART family (smoke-hart: a multi-scale VQ tokenizer pretrained here, its decoder
    retrained on discrete or hybrid latents, HART-micro) through the same dvc repro."""
    _, env, _ = project
    proj = tmp_path_factory.mktemp("hart-project")
    for item in ("dvc.yaml", "rae_core", "flows"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, proj / item)
    _run(["git", "init", "-q"], proj, env)
    _run(["dvc", "init", "-q"], proj, env)
    _run([sys.executable, "-m", "flows.cli", "params", "--preset", "smoke-hart"], proj, env)
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "smoke-hart project"], proj, env)
    repro = _run(["dvc", "repro"], proj, env)
    return proj, env, repro


def test_the_hart_family_runs_every_stage_as_a_kind_of_the_same_pipeline(hart_project):
    import numpy as np
    import torch

    proj, env, repro = hart_project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in repro.stdout
    assert (proj / "models" / "encoder" / "tokenizer.pt").exists()
    ema = torch.load(proj / "models" / "generator" / "ema.pt", weights_only=True)
    assert ema["name"] == "HART-micro" and ema["tokens"]["scales"] == [1, 2, 3, 4]
    # the codebook's usage was logged at every step of the tokenizer's training
    logged = [json.loads(ln) for ln in
              (proj / "runs" / "logs" / "pretrain-encoder.jsonl").read_text().splitlines()]
    usage = [r["step"] for r in logged if "perplexity" in r.get("metrics", {})]
    assert usage == list(range(1, 121))
    curves = [json.loads(ln).get("metrics", {}) for ln in
              (proj / "runs" / "logs" / "train-generator.jsonl").read_text().splitlines()]
    assert {"tokens", "residual", "accuracy"} <= set(next(m for m in curves if "loss" in m))
    samples = np.load(proj / "runs" / "samples" / "samples.npz")
    assert samples["arr_0"].shape == (80, 32, 32, 3)
    m = json.loads((proj / "runs" / "evaluate" / "metrics.json").read_text())
    assert m["images_per_s"] > 0 and {"rfid_discrete", "recon_psnr_discrete"} <= set(m)
    # in-test baseline: the tokenizer reconstructs validation digits better than their mean
    val = np.stack([np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB"),
                               dtype=np.float64) / 255
                    for p in sorted((proj / "data" / "dataset" / "val").glob("*/*.png"))])
    mean_psnr = float(np.mean(-10 * np.log10(((val - val.mean(0)) ** 2).mean((1, 2, 3)))))
    assert m["recon_psnr"] > mean_psnr + 1
    assert json.loads(_run(["dvc", "status", "--json"], proj, env).stdout) == {}


def test_three_families_share_one_leaderboard_with_sampling_speed(hart_project, vae_project):
    proj, env, _ = hart_project
    out = _run([sys.executable, "-m", "flows.cli", "leaderboard", "--format", "json"],
               proj, env).stdout
    (rows,) = json.loads(out).values()
    assert {r["family"] for r in rows} >= {"rae/flow", "vae/ddpm", "hybrid-vq/hart"}
    hart = next(r for r in rows if r["family"] == "hybrid-vq/hart")
    assert hart["images_per_s"] > 0 and hart["model"] == "HART-micro"
    table = _run([sys.executable, "-m", "flows.cli", "leaderboard"], proj, env).stdout
    assert "images_per_s" in table and "hybrid-vq/hart" in table
    client = _mlflow(env).tracking.MlflowClient()
    champ = client.get_model_version_by_alias("hybrid-vq-generator-digits-32", "champion")
    assert str(champ.version) == "1"

"""Resume after SIGKILL, refusal of foreign checkpoints and second writers, failed runs marked in
MLflow, and bit-identical results for the same configuration and seed on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rae_core.errors import DataError
from rae_core.locking import ProjectBusyError, project_lock
from rae_core.paths import CHECKPOINT_FILES, Paths
from rae_core.presets import load_config
from rae_core.store import safe_load
from rae_core.train.common import Checkpointer

ROOT = Path(__file__).resolve().parents[1]
LOOP = ("import json, logging, sys; logging.basicConfig(level=logging.INFO); "
        "from rae_core.train import pretrain_encoder; "
        "pretrain_encoder.train_loop(json.loads(sys.argv[1]))")


def _project(tmp_path: Path, name: str, digits_root: Path) -> Path:
    root = tmp_path / name
    root.mkdir()
    (root / "dataset").symlink_to(digits_root, target_is_directory=True)
    return root


def _pretrain(root: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """The pretrain-encoder stage's loop in a process of its own (40 steps, checkpoint every 10)."""
    cfg = load_config(None, "smoke", ["data.root=dataset", "encoder.pretrain.ckpt_every=10"])
    config = {"cfg": cfg.to_dict(), "root": str(root), "run_dir": str(root / "ckpt"),
              "fingerprint": cfg.fingerprint("data", "encoder", "seed")}
    env = {k: v for k, v in os.environ.items() if k != "RAE_KILL_AT"}
    if kill_at:
        env["RAE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", LOOP, json.dumps(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _losses(root: Path) -> dict[int, float]:
    lines = Paths.at(root).metrics_log("pretrain-encoder").read_text().splitlines()
    recs = [json.loads(ln) for ln in lines]
    return {r["step"]: r["metrics"]["mae_loss"] for r in recs if "metrics" in r}


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return safe_load(Paths.at(root).encoder_dir / "encoder.pt")


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path, digits_root):
    first, again, killed = (_project(tmp_path, n, digits_root) for n in ("a", "b", "killed"))
    for root in (first, again):
        assert _pretrain(root).returncode == 0
    crash = _pretrain(killed, kill_at="pretrain-encoder:20")
    assert crash.returncode == -9  # SIGKILL, right after the step-20 checkpoint
    assert safe_load(killed / "ckpt" / "last.pt")["step"] == 20
    assert not (Paths.at(killed).encoder_dir / "encoder.pt").exists()

    resumed = _pretrain(killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 20" in resumed.stderr
    # same config and seed: bit-identical losses and weights, with or without the crash
    assert _losses(first) == _losses(again) == _losses(killed)
    reference = _weights(first)
    for other in (_weights(again), _weights(killed)):
        assert reference.keys() == other.keys()
        assert all(torch.equal(reference[k], other[k]) for k in reference)

    # latents and their statistics are bit-identical too when computed twice
    from rae_core.stages import _encode_range, _stats_shard

    cfg = load_config(None, "smoke", ["data.root=dataset"]).to_dict()
    z1, y1 = _encode_range(cfg, str(first), 0, 64, both_flips=True)
    z2, y2 = _encode_range(cfg, str(first), 0, 64, both_flips=True)
    assert z1.shape[:2] == (64, 2) and torch.equal(z1, z2) and torch.equal(y1, y2)
    s1, s2 = _stats_shard(cfg, str(first), 0, 64), _stats_shard(cfg, str(first), 0, 64)
    assert all(torch.equal(torch.as_tensor(s1[k]), torch.as_tensor(s2[k])) for k in s1)


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    Checkpointer(tmp_path, "aaaa", "train-generator").save(10, model=model)
    assert Checkpointer(tmp_path, "aaaa", "train-generator").resume(model=model) == 10
    with pytest.raises(DataError, match=r"last.pt: checkpoint of another configuration "
                                        r"\(aaaa, this run is bbbb\)"):
        Checkpointer(tmp_path, "bbbb", "train-generator").resume(model=model)


def test_a_second_writer_is_refused_at_once_with_one_line(tmp_path):
    with project_lock(tmp_path, "rae run"), project_lock(tmp_path, "nested"):  # re-entrant
        with pytest.raises(ProjectBusyError):
            _lock_in_another_process(tmp_path)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "prepare",
                              "--preset", "smoke"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert "runs/.lock: `rae run` (pid" in line and "is writing this project's outputs" in line
    assert not (tmp_path / "data").exists()  # nothing was written
    _lock_in_another_process(tmp_path)  # released


def _lock_in_another_process(root: Path) -> None:
    code = ("import sys; from rae_core.locking import project_lock\n"
            "with project_lock(sys.argv[1], 'probe'): pass")
    res = subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    if res.returncode:
        raise ProjectBusyError(res.stderr.strip().splitlines()[-1])


def test_a_failed_stage_marks_its_mlflow_run_failed_with_the_line(tmp_path, local_mlflow):
    from flows.pipeline import one_line, run_stage

    cfg = load_config(None, "smoke", ["data.dataset=folder", "data.source=nowhere"])
    with pytest.raises(DataError) as err:
        run_stage("prepare", cfg, Paths.at(tmp_path), None)
    assert "nowhere/train: dataset folder not found" in str(err.value)
    (run,) = local_mlflow.search_runs(experiment_names=["rae"], output_format="list")
    assert run.info.status == "FAILED"
    assert run.data.tags["rae.error"] == one_line(err.value) == str(err.value)


def test_credentials_in_params_are_never_logged():
    from flows.tracking import _safe_params

    cfg = load_config(None, "smoke", ["data.dataset=folder",
                                      "data.source=s3://AKIAXYZ:s3cr3t@bucket/ilsvrc"])
    logged = _safe_params(cfg)
    assert logged["data.source"] == "s3://***@bucket/ilsvrc"
    assert not any("s3cr3t" in v or "AKIAXYZ" in v for v in logged.values())
    assert logged["generator.model"] == "DiTDH-micro"


def test_a_stage_killed_with_its_driver_continues_its_mlflow_run(tmp_path, digits_root):
    """The whole `rae stage` process is SIGKILLed after a checkpoint; run again, the stage
    resumes and its metrics go on in the same MLflow run, not a second one."""
    import time

    import mlflow

    proj = tmp_path / "project"
    proj.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS", "PREFECT_HOME")}
    args = ["--preset", "smoke", "--set", "encoder.pretrain.steps=120",
            "--set", "encoder.pretrain.ckpt_every=10"]

    def stage(name: str) -> list[str]:
        return [sys.executable, "-m", "flows.cli", "stage", name, *args]

    (proj / "data").mkdir()
    (proj / "data" / "dataset").symlink_to(digits_root, target_is_directory=True)  # prepared
    proc = subprocess.Popen(stage("pretrain-encoder"), cwd=proj, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    ckpts, end = Paths.at(proj).checkpoints, time.time() + 240

    def logged_steps() -> set[int]:
        runs = mlflow.search_runs(experiment_names=["rae"], output_format="list",
                                  filter_string="tags.`rae.stage` = 'pretrain-encoder'")
        history = [m for r in runs for m in mlflow.tracking.MlflowClient()
                   .get_metric_history(r.info.run_id, "mae_loss")]
        return {m.step for m in history}

    # past the first checkpoint, with some of its steps already in MLflow
    while time.time() < end and not (any(ckpts.glob("pretrain-encoder-*/last.pt"))
                                     and logged_steps()):
        time.sleep(0.5)
    # the driver and everything it started (the local Ray and its training worker), as a
    # crash of the machine would take them
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=30)
    (run_dir,) = ckpts.glob("pretrain-encoder-*")  # last.pt, or prev.pt if a save was cut short
    killed_at = safe_load(next(p for n in CHECKPOINT_FILES if (p := run_dir / n).exists()))["step"]
    assert 10 <= killed_at < 120, "the kill came too late to test a resume"
    before = logged_steps()
    again = subprocess.run(stage("pretrain-encoder"), cwd=proj, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]

    runs = mlflow.search_runs(experiment_names=["rae"], output_format="list",
                              filter_string="tags.`rae.stage` = 'pretrain-encoder'")
    assert len(runs) == 1, [r.info.status for r in runs]
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags["rae.resumed"] == "true"
    steps = {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id,
                                                                               "mae_loss")}
    assert before <= steps and max(steps) == 120  # one curve across the crash
    assert run.data.metrics["stage.resumed_at"] == killed_at


def test_a_crash_inside_a_checkpoint_save_still_continues_the_stages_mlflow_run(tmp_path,
                                                                                local_mlflow):
    """A save moves last.pt to prev.pt before it writes the new last.pt: a crash between the two
    leaves prev.pt alone, which the loop resumes from, so the stage's MLflow run goes on too."""
    from flows import tracking

    cfg, paths = load_config(None, "smoke", []), Paths.at(tmp_path)
    assert not paths.has_resume_point("pretrain-encoder")
    first = tracking.stage_run(cfg, paths.root, "pretrain-encoder", None, resuming=False)
    run_dir = paths.checkpoints / "pretrain-encoder-0123abcd"
    run_dir.mkdir(parents=True)
    (run_dir / "prev.pt").write_bytes(b"")
    assert paths.has_resume_point("pretrain-encoder")
    assert not paths.has_resume_point("train-decoder")
    again = tracking.stage_run(cfg, paths.root, "pretrain-encoder", None,
                               resuming=paths.has_resume_point("pretrain-encoder"))
    assert again == first
    assert len(local_mlflow.search_runs(experiment_names=["rae"], output_format="list")) == 1

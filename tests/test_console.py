"""What a user sees: a line per stage, progress bars only on a terminal, an example under every
command's --help, and the stages' logs (a Ray worker's too) in the Prefect flow run's logs."""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flows import console
from flows.cli import parser
from flows.tracking import MetricsForwarder
from rae_core.paths import Paths
from rae_core.presets import load_config

ROOT = Path(__file__).resolve().parents[1]

# What each stage returned in a smoke run (rae run --preset smoke), wall_s added by run_stage.
SMOKE_OUTPUTS = {
    "prepare": {"train_images": 1438, "val_images": 359, "classes": 10, "wall_s": 1.84},
    "pretrain-encoder": {"steps": 40, "resumed_at": 0, "final_mae_loss": 0.815441906452179,
                         "wall_s": 23.0, "startup_s": 19.8},
    "stats": {"count": 1438, "mean_abs_mean": 0.7665, "mean_var": 0.1409, "min_var": 0.0013,
              "wall_s": 3.91},
    "extract": {"shards": 4, "reused_shards": 0, "images": 1438, "wall_s": 0.457},
    "train-decoder": {"steps": 40, "resumed_at": 0, "val_psnr": 8.007034748975457,
                      "val_l1": 0.3214, "checkpoint_dir": "runs/checkpoints/train-decoder-5120",
                      "wall_s": 19.1},
    "train-generator": {"steps": 60, "resumed_at": 0, "shift": 0.5,
                        "final_loss": 0.7911446690559387, "params": 843708, "wall_s": 25.5},
    "sample": {"images": 80, "shards": 2, "reused_shards": 0,
               "images_per_s": 56.363889270791645, "sampling_s": 1.42,
               "device": "x86_64 cpu x1", "wall_s": 4.17},
    "evaluate": {"fid": 130.183904942838, "precision": 0.0, "recall": 0.0, "num_samples": 80,
                 "extractor": "domain:137fc98ca23c", "class_accuracy": 0.0875,
                 "rfid": 139.35, "recon_psnr": 8.007, "images_per_s": 56.36, "wall_s": 75.2},
}


def test_every_stage_ends_with_its_wall_time_and_key_figure():
    lines = {name: console.stage_line(name, out) for name, out in SMOKE_OUTPUTS.items()}
    assert lines == {
        "prepare": "✓ prepare  1.8 s  1438 train / 359 val images, 10 classes",
        "pretrain-encoder": "✓ pretrain-encoder  23.0 s  final loss 0.8154",
        "stats": "✓ stats  3.9 s  statistics of 1438 latents",
        "extract": "✓ extract  0.5 s  1438 images in 4 shards",
        "train-decoder": "✓ train-decoder  19.1 s  val PSNR 8.01 dB",
        "train-generator": "✓ train-generator  25.5 s  final loss 0.7911",
        "sample": "✓ sample  4.2 s  80 images, 56.4 images/s",
        "evaluate": "✓ evaluate  1 min 15 s  FID 130.18, class accuracy 8.8%",
    }


def test_a_stage_prints_its_name_as_it_starts_and_its_line_as_it_ends(capsys):
    console.stage_started("sample")
    console.stage_finished("sample", SMOKE_OUTPUTS["sample"])
    assert capsys.readouterr() == ("▶ sample\n✓ sample  4.2 s  80 images, 56.4 images/s\n", "")


def test_skipped_resumed_and_autoencoder_stages_say_so():
    skipped = {"skipped": True, "reason": "encoder dinov2-b uses pretrained weights",
               "wall_s": 0.1}
    assert console.stage_line("pretrain-encoder", skipped) == \
        "✓ pretrain-encoder  0.1 s  skipped: encoder dinov2-b uses pretrained weights"
    vae = {"steps": 120, "resumed_at": 80, "val_psnr": 21.456, "val_l1": 0.05, "wall_s": 61}
    assert console.stage_line("pretrain-encoder", vae) == \
        "✓ pretrain-encoder  1 min 01 s  val PSNR 21.46 dB  (resumed at step 80)"
    done = {"steps": 60, "resumed_at": 60, "final_loss": float("nan"), "wall_s": 30.0}
    assert console.stage_line("train-generator", done) == \
        "✓ train-generator  30.0 s  no steps left to train  (resumed at step 60)"
    kept = {"shards": 4, "reused_shards": 3, "images": 1438, "wall_s": 0.2}
    assert console.stage_line("extract", kept).endswith("1438 images in 4 shards (3 kept)")


def test_a_run_ends_pointing_at_the_leaderboard_the_grid_and_the_ui(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = Paths.at(tmp_path)
    assert "grid.png" not in console.next_steps(paths, 12)  # a run stopped before sampling
    (paths.samples_dir).mkdir(parents=True)
    (paths.samples_dir / "grid.png").write_bytes(b"")
    assert console.next_steps(paths, 109.1).splitlines() == [
        "Done in 1 min 49 s. Next:",
        "  rae leaderboard        the FID leaderboard",
        "  runs/samples/grid.png  the sample grid",
        "  rae ui                 the MLflow UI: runs, curves, sample grids, registered models",
    ]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _forward(tmp_path, run_id: str):
    """A training stage's log as its rank-0 worker writes it, forwarded with a bar of 60."""
    log = tmp_path / "runs" / "logs" / "train-generator.jsonl"
    with MetricsForwarder(run_id, log, interval=3600, steps=60) as fwd:
        with open(log, "a") as f:
            for step in (10, 20):
                f.write(json.dumps({"step": step, "time": 1.0e9 + step,
                                    "metrics": {"loss": 1 / step}}) + "\n")
        fwd.flush()
        return bool(fwd._bar.disable), fwd._bar.n  # as they are before the bar closes


def test_bars_are_quiet_off_a_terminal_and_move_on_one(tmp_path, monkeypatch, capsys,
                                                       local_mlflow):
    from flows import tracking
    from rae_core.metrics.precision_recall import precision_recall

    run_id = tracking.start_run(load_config(None, "smoke"), tmp_path, "train-generator")
    capsys.readouterr()  # MLflow's own lines about its new database
    disabled, _ = _forward(tmp_path, run_id)
    precision_recall(np.eye(8), np.eye(8)[::-1], k=2, batch=3)
    assert disabled and capsys.readouterr().err == ""  # pytest's stderr is no terminal
    steps = [m.step for m in tracking.client().get_metric_history(run_id, "loss")]
    assert steps == [10, 20]

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert _forward(tmp_path, run_id) == (False, 20)
    shown = terminal.getvalue()
    assert "train-generator" in shown and "/60" in shown and shown.endswith("\r")  # cleared


def test_every_command_shows_an_example_under_its_help():
    p = parser()
    (sub,) = [a for a in p._actions if a.dest == "command"]
    assert {"run", "stage", "leaderboard", "ui"} <= set(sub.choices)
    for name, command in sub.choices.items():
        text = command.format_help()
        assert f"example:\n  rae {name}" in text, f"`rae {name} --help` shows no example"


FLOW = textwrap.dedent("""
    import logging, sys
    from pathlib import Path

    from flows.env import configure

    root = Path(sys.argv[1])
    configure(root)
    import ray
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.tracking import MetricsForwarder
    from rae_core.paths import Paths
    from rae_core.presets import load_config
    from rae_core.train.runner import ensure_ray, logging_to

    def loop(config):
        log = logging.getLogger("rae_core.train.generator")
        log.info("worker says hello")
        log.warning("worker warns")

    @task
    def stage():
        logging.getLogger("flows.pipeline").info("driver says hello")
        ensure_ray(load_config(None, "smoke"))
        path = Paths.at(root).metrics_log("train-generator")
        with MetricsForwarder("unused", path, interval=0.5):
            ray.get(ray.remote(logging_to(path, loop)).remote({}))

    @flow
    def pipeline():
        stage()

    state = pipeline(return_state=True)
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))
    print("\\n".join(f"{log.level} {log.name} {log.message}" for log in logs))
""")


@pytest.mark.slow
def test_driver_and_ray_worker_logs_reach_the_flow_runs_logs_and_the_console_stays_quiet(
        tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    res = subprocess.run([sys.executable, "-c", FLOW, str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = res.stdout.splitlines()
    assert "20 flows.pipeline driver says hello" in logs
    assert "20 rae_core.train.generator [rank 0] worker says hello" in logs
    assert "30 rae_core.train.generator [rank 0] worker warns" in logs
    assert any("Finished in state Completed()" in line for line in logs)  # Prefect's own
    # the console: the worker's warning, none of the INFO lines
    assert "worker warns" in res.stderr
    for quiet in ("hello", "Finished in state", "Beginning flow run"):
        assert quiet not in res.stderr, res.stderr


def test_training_bars_last_as_long_as_the_configured_steps():
    cfg = load_config(None, "smoke")
    assert [console.training_steps(s, cfg) for s in
            ("pretrain-encoder", "train-decoder", "train-generator", "sample")] == \
        [cfg.encoder.pretrain.steps, cfg.decoder.steps, cfg.generator.steps, None]

"""The rehearsal preset end to end on the CPU: `rae run --preset rehearsal` with its widths,
depths, steps and sample counts shrunk by --set, and its resolution (256 px), token grid (16x16)
and stage graph (the weak model of AutoGuidance trained by train-generator) as they are, so
the 256-px code path runs on every commit."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flows import services
from rae_core.errors import ConfigError
from rae_core.presets import load_config
from rae_core.throughput import PEAK_BF16, figures, peak_flops

BIN = Path(sys.executable).parent
STAGES = ["prepare", "pretrain-encoder", "stats", "extract", "train-decoder", "train-generator",
          "sample", "evaluate"]
# the models' architecture names stay (DINOv2-B, ViT-XL, DiTDH-XL, DiTDH-S); their sizes shrink
SHRINK = [
    "data.per_class=10", "stats.batch_size=64", "extract.batch_size=64",
    "encoder.depth=1", "encoder.width=64", "encoder.heads=2",
    "decoder.hidden=64", "decoder.depth=1", "decoder.heads=2", "decoder.steps=4",
    "decoder.batch_size=8", "decoder.warmup_steps=1", "decoder.gan.disc_start_step=2",
    "decoder.gan.gen_start_step=3", "decoder.eval_every=4", "decoder.ckpt_every=4",
    "generator.hidden=64", "generator.depth=1", "generator.heads=2", "generator.head_hidden=64",
    "generator.steps=4", "generator.batch_size=8", "generator.decay_start_step=2",
    "generator.sample_every=4", "generator.ckpt_every=4",
    "generator.weak.hidden=64", "generator.weak.depth=1", "generator.weak.heads=2",
    "generator.weak.head_hidden=64", "generator.weak.steps=2",
    "sample.num_per_class=8", "sample.steps=2", "sample.batch_size=40", "sample.shard_size=40",
    "evaluate.classifier_epochs=1", "evaluate.batch_size=40",
    "ray.use_gpu=false", "ray.cpus_per_worker=1",
]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    proj = tmp_path_factory.mktemp("rehearsal")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "RAY_ADDRESS", "PREFECT_HOME", "RAE_LOCAL_RAY",
                        "MLFLOW_TRACKING_URI")}
    env.update(RAE_SERVICES_IDLE_S="30", PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    cmd = [str(BIN / "rae"), "run", "--preset", "rehearsal"]
    for item in SHRINK:
        cmd += ["--set", item]
    try:
        res = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=600)
    finally:
        services.stop_all(proj / ".prefect")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return proj, res


def _metrics(proj: Path) -> dict[str, dict[str, float]]:
    """stage -> its MLflow run's metrics."""
    with sqlite3.connect(proj / "mlflow.db") as db:
        rows = db.execute("SELECT t.value, m.key, m.value FROM metrics m JOIN tags t "
                          "ON t.run_uuid = m.run_uuid WHERE t.key = 'rae.stage'").fetchall()
    out: dict[str, dict[str, float]] = {}
    for stage, key, value in rows:
        out.setdefault(stage, {})[key] = value
    return out


def test_every_stage_ran_at_256_px_on_16x16_tokens(rehearsal):
    proj, res = rehearsal
    for stage in STAGES:
        assert f"✓ {stage}" in res.stdout, stage
    image = next((proj / "data" / "dataset" / "train").glob("*/*.png"))
    from PIL import Image

    assert Image.open(image).size == (256, 256)  # crops stored at the working size
    shard = torch.load(next((proj / "data" / "latents").glob("shard-*.pt")), weights_only=True)
    assert tuple(shard["latents"].shape[1:]) == (2, 64, 16, 16)  # both flips, 16x16 tokens
    assert shard["latents"].dtype == torch.bfloat16
    assert (proj / "models" / "generator" / "weak" / "ema.pt").is_file()
    weak = torch.load(proj / "models" / "generator" / "weak" / "ema.pt", weights_only=True)
    main = torch.load(proj / "models" / "generator" / "ema.pt", weights_only=True)
    assert (weak["name"], weak["step"]) == ("DiTDH-S", 2)
    assert (main["name"], main["step"]) == ("DiTDH-XL", 4)
    with np.load(proj / "runs" / "samples" / "samples.npz") as s:
        assert s["arr_0"].shape == (80, 256, 256, 3)
        assert sorted(set(s["arr_1"].tolist())) == list(range(10))


def test_each_stage_logs_its_throughput(rehearsal):
    proj, _ = rehearsal
    m = _metrics(proj)
    for stage in ("extract", "train-decoder", "train-generator", "sample"):
        assert m[stage]["stage.images_per_s"] > 0, stage
        assert "stage.mfu" not in m[stage]  # no peak FLOP/s on the CPU
    assert m["train-generator"]["stage.weak_images_per_s"] > 0
    assert m["evaluate"]["eval_images_per_s"] > 0


def test_evaluates_yardstick_was_made_before_evaluate_began(rehearsal):
    import json

    proj, _ = rehearsal
    (clf,) = (proj / "models" / "reference").glob("classifier-*.pt")
    (ref,) = (proj / "models" / "reference").glob("train-reference-*.npz")
    log = [json.loads(line) for line in (proj / "runs" / "logs" / "evaluate.jsonl").open()]
    began = min(r["time"] for r in log)
    assert clf.stat().st_mtime < began and ref.stat().st_mtime < began
    assert not any("domain classifier: val accuracy" in r.get("log", {}).get("message", "")
                   for r in log)  # evaluate loaded it, did not train it


def test_the_leaderboard_row_says_random_init(rehearsal):
    proj, _ = rehearsal
    with sqlite3.connect(proj / "mlflow.db") as db:
        labels = dict(db.execute(
            "SELECT s.value, t.value FROM tags t JOIN tags s ON s.run_uuid = t.run_uuid "
            "WHERE t.key = 'rae.encoder' AND s.key = 'rae.stage'").fetchall())
        row = db.execute("SELECT t.value FROM tags t JOIN tags k ON k.run_uuid = t.run_uuid "
                         "WHERE t.key = 'rae.encoder' AND k.key = 'rae.kind' "
                         "AND k.value = 'evaluation'").fetchall()
    assert set(labels) == set(STAGES)
    assert set(labels.values()) == {"dinov2-b (random init, depth 1, width 64, heads 2)"}
    assert row == [("dinov2-b (random init, depth 1, width 64, heads 2)",)]


def test_random_init_and_a_shrunk_encoder_are_refused_elsewhere():
    with pytest.raises(ConfigError, match=r"^encoder.random_init: true is not valid in preset "
                                          r"'imagenet256'"):
        load_config(None, "imagenet256", ["encoder.random_init=true"])
    with pytest.raises(ConfigError, match=r"^encoder.width: 64 is not valid with "
                                          r"encoder.random_init=false"):
        load_config(None, "rehearsal", ["encoder.random_init=false", "encoder.width=64"])
    cfg = load_config(None, "rehearsal")
    assert (cfg.data.resolution, cfg.encoder.name, cfg.decoder.model, cfg.generator.model,
            cfg.generator.weak.model) == (256, "dinov2-b", "ViT-XL", "DiTDH-XL", "DiTDH-S")
    assert cfg.sample.weak_model == "models/generator/weak/ema.pt"


def test_mfu_needs_a_known_peak(monkeypatch):
    assert peak_flops("cpu") is None
    assert figures(100, 2.0, 1e12, "cpu") == {"images_per_s": 50.0}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert peak_flops("cuda:0") == PEAK_BF16["H200"]
    # 50 images/s x 1 TFLOP on two H200s
    assert figures(100, 2.0, 1e12, "cuda:0", world=2)["mfu"] == pytest.approx(
        50e12 / (2 * 989e12))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some GPU")
    assert "mfu" not in figures(100, 2.0, 1e12, "cuda:0")


def test_a_random_init_encoder_is_the_same_in_every_process():
    """Stats, extract and the training stages each build the encoder: seeded, they agree."""
    from rae_core.autoencoder import latent_shape, load_encoder
    from rae_core.paths import Paths

    cfg = load_config(None, "rehearsal", ["encoder.depth=1", "encoder.width=64",
                                          "encoder.heads=2"])
    a, b = (load_encoder(cfg, Paths.at(".")) for _ in range(2))
    assert a.input_size == 224  # 256 px resized for patch 14: still a 16x16 grid
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    za = a.encode(x)
    assert za.shape == (2, 64, 16, 16) and latent_shape(cfg) == (64, 16, 16)
    assert torch.equal(za, b.encode(x))
    assert a.weights_label == "random depth=1 embed_dim=64 num_heads=2"


def test_decoder_overrides_shrink_the_registered_vit():
    from rae_core.decoder import build_decoder

    dec = build_decoder("ViT-XL", 64, 16, 16, (0.5,) * 3, (0.5,) * 3, width=64, depth=1,
                        heads=2)
    assert len(dec.blocks) == 1
    assert dec(torch.zeros(1, 64, 16, 16)).shape == (1, 3, 256, 256)
    full = build_decoder("ViT-XL", 64, 16, 16, (0.5,) * 3, (0.5,) * 3, depth=1)
    assert len(full.blocks) == 1 and full.pos_embed.shape[-1] == 1152  # width kept

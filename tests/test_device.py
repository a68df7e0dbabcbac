"""Every stage computes on the device its process was given (rae_core.device.of).

Without a GPU, the device is forced to `meta`: tensors there have shapes but no values, so a
stage runs until it needs a value (a copy to the CPU to save or reduce, a Python bool), and a
dispatch mode records the device of every tensor the heavy ops (convolutions, matrix products,
attention) received up to there. A model or batch left on the CPU shows up as a CPU operand.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rae_core import device, evaluation, generate, stages
from rae_core.config import from_dict
from rae_core.paths import Paths
from rae_core.presets import load_config

HEAVY = ("convolution", "mm", "addmm", "bmm", "baddbmm", "scaled_dot_product")
META = torch.device("meta")


class HeavyOps(TorchDispatchMode):
    """(op, devices of its tensor operands) of every heavy aten op dispatched."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, set[str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HEAVY or name.startswith("_scaled_dot_product"):
            self.ops.append((name, {t.device.type for t in tree_leaves((args, kwargs))
                                    if isinstance(t, torch.Tensor)}))
        return func(*args, **kwargs)


def on_meta(monkeypatch, fn, *args) -> list[tuple[str, set[str]]]:
    """The heavy ops of fn(*args) with the process's device forced to meta, run until a value
    is needed (meta tensors have none)."""
    monkeypatch.setattr(device, "of", lambda cfg: META)
    monkeypatch.setattr(device, "resolve", lambda use_gpu: META)
    stopped = None
    with HeavyOps() as mode:
        try:
            fn(*args)
        except (NotImplementedError, RuntimeError) as e:
            stopped = e
    assert mode.ops, f"no heavy op ran before {stopped!r}"
    elsewhere = [(op, devs) for op, devs in mode.ops if devs != {"meta"}]
    assert not elsewhere, f"{len(elsewhere)} of {len(mode.ops)} heavy ops not on the given " \
                          f"device, first {elsewhere[0]} (then: {stopped!r})"
    return mode.ops


@pytest.fixture(scope="module")
def project(tmp_path_factory, digits_root):
    """A smoke project over the digits with the files the stages before sample and evaluate
    write (untrained models), a domain classifier and samples."""
    from rae_core import autoencoder as ae
    from rae_core.encoders import LatentStats, build_encoder
    from rae_core.generator import build_generator, checkpoint_meta, token_space
    from rae_core.metrics import DomainClassifier, save_classifier
    from rae_core.train.generator import checkpoint_dir

    root = tmp_path_factory.mktemp("device-project")
    cfg = load_config(None, "smoke", [f"data.root={digits_root}", "sample.guidance=none",
                                      "sample.num_per_class=2", "sample.steps=2"])
    paths = Paths.at(root)
    torch.manual_seed(0)
    paths.encoder_dir.mkdir(parents=True)
    encoder = build_encoder(cfg.encoder.name, cfg.data.resolution, random_init=True)
    torch.save(encoder.state_dict(), paths.encoder_dir / "encoder.pt")
    encoder = ae.load_encoder(cfg, paths)
    stats = LatentStats(tuple(encoder.latent_shape))
    stats.update(encoder.encode(torch.rand(8, 3, cfg.data.resolution, cfg.data.resolution)))
    stats.save(paths.stats_file, ae.stats_identity(cfg, encoder))
    paths.decoder_dir.mkdir(parents=True)
    decoder = ae.build_decoder_for(cfg, paths, encoder)
    torch.save({"model": decoder.state_dict()}, paths.decoder_dir / "decoder.pt")
    paths.generator_dir.mkdir(parents=True)
    model = build_generator(cfg, tuple(encoder.latent_shape), token_space(cfg, paths, encoder))
    torch.save({"model": model.state_dict(), "name": cfg.generator.model,
                "overrides": cfg.generator.overrides(), **checkpoint_meta(model)},
               paths.generator_dir / "ema.pt")
    checkpoint_dir(cfg, paths).mkdir(parents=True)
    shutil.copy(paths.generator_dir / "ema.pt", checkpoint_dir(cfg, paths) / "ema-step10.pt")
    save_classifier(DomainClassifier(cfg.data.num_classes),
                    paths.reference_dir / f"classifier-{evaluation._dataset_key(cfg)}"
                                          f"-e{cfg.evaluate.classifier_epochs}.pt")
    rng = np.random.default_rng(0)
    paths.samples_dir.mkdir(parents=True)
    generate.save_samples(paths.samples_dir / "samples.npz",
                          rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
                          np.arange(40) % cfg.data.num_classes)
    return cfg, paths


def test_the_recorder_sees_a_model_left_on_the_cpu(monkeypatch):
    """What the tests below rely on: a forgotten .to(device) fails them."""
    conv = torch.nn.Conv2d(3, 4, 3)

    def forgot_the_model(x):
        conv(x.to(device.of(None)))

    with pytest.raises(AssertionError, match="not on the given device"):
        on_meta(monkeypatch, forgot_the_model, torch.rand(1, 3, 8, 8))
    ops = on_meta(monkeypatch, lambda x: conv.to(device.of(None))(x.to(device.of(None))),
                  torch.rand(1, 3, 8, 8))
    assert ops == [("convolution", {"meta"})]


def test_stats_and_extract_encode_on_the_given_device(project, monkeypatch, tmp_path):
    cfg, paths = project
    args = (cfg.to_dict(), str(paths.root), 0, 16)
    assert any(op == "convolution" for op, _ in on_meta(monkeypatch, stages._stats_shard, *args))
    ops = on_meta(monkeypatch, stages._extract_shard, *args, str(tmp_path / "shard.pt"))
    assert {"convolution", "addmm"} <= {op for op, _ in ops}
    assert not (tmp_path / "shard.pt").exists()


def test_sampling_runs_generator_and_decoder_on_the_given_device(project, monkeypatch,
                                                                  tmp_path):
    cfg, paths = project
    labels = [0, 1, 2, 3]
    # without guidance the 2 Euler steps need no value: the decoder runs too, and the
    # images are first needed on the CPU as uint8
    on_meta(monkeypatch, generate._shard, cfg.to_dict(), str(paths.root), 0, labels,
            str(tmp_path / "shard.npz"))
    assert not (tmp_path / "shard.npz").exists()


def test_evaluation_extracts_features_and_reconstructs_on_the_given_device(project,
                                                                             monkeypatch):
    cfg, paths = project
    extractor, clf = evaluation.build_extractor(cfg, paths, META)
    assert next(clf.parameters()).device == META and extractor.name.startswith("domain:")
    on_meta(monkeypatch, extractor, torch.rand(4, 3, 32, 32))
    on_meta(monkeypatch, lambda: evaluation.reconstructor(cfg, paths, 3)(torch.rand(4, 3, 32, 32)))
    ref = evaluation.FeatureStats(np.zeros(64), np.eye(64), 100, extractor.name)
    on_meta(monkeypatch, evaluation.fid_curve, cfg, paths, extractor, ref)


def test_autocast_is_off_on_the_cpu_whatever_precision_says():
    a, b = torch.rand(4, 8), torch.rand(8, 3)
    for bf16 in (False, True):
        with device.autocast(torch.device("cpu"), bf16):
            assert not torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.float32
    with device.autocast(META, True):  # no autocast of its own: fp32
        assert (a.to(META) @ b.to(META)).dtype == torch.float32


def test_stages_ask_for_bf16_as_precision_says_and_compute_the_same_on_the_cpu(project,
                                                                               monkeypatch):
    """The stages pass precision on to device.autocast; on the CPU bf16 changes nothing."""
    cfg, paths = project
    asked = []
    real = device.autocast

    def recording(here, bf16):
        asked.append((here.type, bf16))
        return real(here, bf16)

    monkeypatch.setattr(device, "autocast", recording)
    latents = {}
    for precision in ("fp32", "bf16"):
        c = cfg.to_dict()
        c["extract"]["precision"] = precision
        latents[precision], _ = stages._encode_range(c, str(paths.root), 0, 8, both_flips=True)
    assert asked == [("cpu", False), ("cpu", True)]
    assert latents["bf16"].dtype == torch.float32
    assert torch.equal(latents["fp32"], latents["bf16"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this process sees a GPU")
def test_a_worker_that_reserved_a_gpu_it_does_not_see_fails_in_one_line(project):
    from rae_core.errors import ConfigError

    cfg, paths = project
    c = cfg.to_dict()
    c["ray"]["use_gpu"] = True
    with pytest.raises(ConfigError, match=r"^ray.use_gpu: true, but this process sees no CUDA "
                                          r"device [^\n]*set ray.use_gpu=false[^\n]*$"):
        stages._stats_shard(c, str(paths.root), 0, 8)


def test_evaluate_runs_on_a_ray_worker_with_the_drivers_results(project, local_ray,
                                                                monkeypatch):
    from rae_core.train import runner

    cfg, paths = project
    c = cfg.to_dict()
    c["evaluate"]["curve_per_class"] = 0
    cfg = from_dict(c)
    assert runner.run_on_worker(os.getpid, cfg=cfg) != os.getpid()
    assert runner.run_on_worker(torch.get_num_threads, cfg=cfg) == cfg.ray.cpus_per_worker
    on_worker = stages.evaluate(cfg, paths)
    here = evaluation.run(cfg, paths)
    assert on_worker.keys() == here.keys()
    assert on_worker.pop("eval_images_per_s") > 0 and here.pop("eval_images_per_s") > 0  # timing
    for k, v in here.items():
        assert on_worker[k] == (pytest.approx(v, rel=1e-6, nan_ok=True)
                                if isinstance(v, float) else v), k
    log = paths.metrics_log("evaluate").read_text()
    assert "_evaluate: worker 0 up" in log and "evaluate: {" in log


def test_the_fid_curve_scored_as_ray_tasks_equals_the_curve_scored_in_turn(
        project, local_ray, monkeypatch, tmp_path, one_thread):
    from rae_core.train import runner
    from rae_core.train.generator import checkpoint_dir

    cfg, paths = project
    shutil.copytree(paths.root, tmp_path / "p")
    paths = Paths.at(tmp_path / "p")
    cfg = from_dict({**cfg.to_dict(), "evaluate": {**cfg.evaluate.model_dump(),
                                                   "curve_per_class": 2}})
    first = checkpoint_dir(cfg, paths) / "ema-step10.pt"
    ckpt = torch.load(first, weights_only=False)
    torch.manual_seed(1)
    ckpt["model"] = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                     for k, v in ckpt["model"].items()}
    torch.save(ckpt, first.with_name("ema-step20.pt"))  # a second, different point
    extractor, _ = evaluation.build_extractor(cfg, paths)
    ref = evaluation.FeatureStats(np.zeros(64), np.eye(64), 100, extractor.name)
    calls, real = [], runner.map_shards
    monkeypatch.setattr(runner, "map_shards", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    runner.ensure_ray(cfg)
    side_by_side = evaluation.fid_curve(cfg, paths, extractor, ref)
    monkeypatch.setattr(evaluation, "_ray_running", lambda: False)
    in_turn = evaluation.fid_curve(cfg, paths, extractor, ref)
    assert len(calls) == 1 and len(calls[0]) == 2  # one Ray task per checkpoint
    assert [c["step"] for c in side_by_side] == [10, 20]
    assert side_by_side[0]["fid"] != pytest.approx(side_by_side[1]["fid"])
    assert side_by_side == [pytest.approx(c, rel=1e-6) for c in in_turn]

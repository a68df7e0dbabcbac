"""Non-finite steps in real training loops (run in this process on the smoke preset): skipped and
counted, a run of them restores the last checkpoint with a remedy, a persistent one stops the
run with one line, and a run without any trains exactly as without the guard."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from rae_core.data.loader import StepLoader
from rae_core.encoders import TinyMAE
from rae_core.errors import RaeError
from rae_core.paths import Paths
from rae_core.plots import plot_file
from rae_core.presets import load_config
from rae_core.train import pretrain_encoder
from rae_core.train.common import NonFiniteError, NonFiniteGuard, warmup_cosine

NAN = float("nan")


class Recorder:
    """Follows a loop through its steps: each step's start (by the batch it draws), the weights
    (parameters) of its modules where the guard looks at the step, before any update of it,
    and the learning rates it sets. (Buffers a forward pass updates, as spectral norm's, are
    no update.)"""

    def __init__(self, monkeypatch, loop_module):
        self.step, self.visits, self.weights, self.lrs = None, [], [], []
        draw, set_lr, finite = StepLoader.get, loop_module.set_lr, NonFiniteGuard.finite

        def get(loader, step, generator):
            self.step = step
            self.visits.append(step)
            return draw(loader, step, generator)

        def record_lr(opt, lr):
            self.lrs.append((self.step, lr))
            set_lr(opt, lr)

        def looked_at(guard, *values):
            self.weights.append((self.step, {
                name: {k: v.detach().clone() for k, v in obj.named_parameters()}
                for name, obj in guard.states.items() if isinstance(obj, torch.nn.Module)}))
            return finite(guard, *values)

        monkeypatch.setattr(StepLoader, "get", get)
        monkeypatch.setattr(loop_module, "set_lr", record_lr)
        monkeypatch.setattr(NonFiniteGuard, "finite", looked_at)

    def before(self, step: int, visit: int = 0) -> dict:
        """The weights at the `visit`-th run of `step`, before its update."""
        return [w for s, w in self.weights if s == step][visit]

    def lr(self, step: int, visit: int = -1) -> float:
        return [lr for s, lr in self.lrs if s == step][visit]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        all(torch.equal(a[m][k], b[m][k]) for k in a[m]) for m in a)


def nan_loss(monkeypatch, rec: Recorder, steps, once: bool = True):
    """The MAE's loss times NaN at the given steps (the first time each runs, with `once`), so
    that its gradients are NaN too."""
    pending, loss = set(steps), TinyMAE.mae_loss

    def poisoned(model, *args, **kwargs):
        out = loss(model, *args, **kwargs)
        if rec.step in pending:
            if once:
                pending.discard(rec.step)
            out = out * NAN
        return out

    monkeypatch.setattr(TinyMAE, "mae_loss", poisoned)


def _pretrain(root: Path, *overrides: str) -> dict:
    cfg = load_config(None, "smoke", ["data.root=dataset", "encoder.pretrain.ckpt_every=10",
                                      *overrides])
    return pretrain_encoder.train_loop({"cfg": cfg.to_dict(), "root": str(root),
                                        "run_dir": str(root / "ckpt"), "fingerprint": "test"})


def _log(root: Path, stage: str = "pretrain-encoder") -> list[dict]:
    return [json.loads(x) for x in Paths.at(root).metrics_log(stage).read_text().splitlines()]


def _metric(root: Path, name: str, stage: str = "pretrain-encoder") -> list[tuple[int, float]]:
    return [(r["step"], r["metrics"][name]) for r in _log(root, stage)
            if name in r.get("metrics", {})]


@pytest.fixture
def root(tmp_path, digits_root, one_thread):
    (tmp_path / "dataset").symlink_to(digits_root, target_is_directory=True)
    return tmp_path


def test_a_non_finite_step_is_skipped_counted_and_leaves_the_weights_as_they_were(
        root, monkeypatch, caplog):
    rec = Recorder(monkeypatch, pretrain_encoder)
    nan_loss(monkeypatch, rec, {5, 12})
    with caplog.at_level(logging.WARNING, "rae_core"):
        _pretrain(root, "encoder.pretrain.steps=20")
    assert rec.visits == list(range(20))  # two skips, no restore
    assert _equal(rec.before(6), rec.before(5)) and _equal(rec.before(13), rec.before(12))
    assert not _equal(rec.before(5), rec.before(4))  # a finite step does update them
    assert {s for s, _ in rec.lrs} == set(range(20)) - {5, 12}  # no optimiser step either
    assert _metric(root, "nonfinite_steps") == [(6, 1.0), (13, 2.0)]
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert skipped == ["pretrain-encoder: loss or gradient norm not finite at step 5; update "
                       "skipped (1 in a row, 1 in all)",
                       "pretrain-encoder: loss or gradient norm not finite at step 12; update "
                       "skipped (1 in a row, 2 in all)"]
    assert all(math.isfinite(v) for _, v in _metric(root, "mae_loss"))


def test_patience_restores_the_last_checkpoint_and_halves_the_learning_rate(
        root, monkeypatch, caplog):
    rec = Recorder(monkeypatch, pretrain_encoder)
    nan_loss(monkeypatch, rec, {13, 14, 15})
    with caplog.at_level(logging.WARNING, "rae_core"):
        _pretrain(root, "encoder.pretrain.steps=30", "encoder.pretrain.nonfinite_patience=3")
    assert rec.visits == [*range(16), *range(10, 30)]  # back to the step-10 checkpoint
    assert _equal(rec.before(10, visit=1), rec.before(10, visit=0))
    p = load_config(None, "smoke").encoder.pretrain
    schedule = [warmup_cosine(s, p.lr, p.lr * 0.1, p.warmup_steps, 30) for s in range(30)]
    assert [rec.lr(s) for s in range(10)] == schedule[:10]
    assert [rec.lr(s) for s in range(10, 30)] == [0.5 * lr for lr in schedule[10:]]
    assert [lr for _, lr in _metric(root, "lr")] == [schedule[9], 0.5 * schedule[19],
                                                       0.5 * schedule[29]]
    line = ("pretrain-encoder: 3 non-finite steps in a row at step 15 "
            "(encoder.pretrain.nonfinite_patience); restoring step 10 with half the learning rate")
    assert line in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    events = [r["event"] for r in _log(root) if "event" in r]
    assert events == ["non-finite steps: restoring step 10 with half the learning rate"]
    assert _metric(root, "nonfinite_restores") == [(16, 1.0)]
    assert _metric(root, "lr_scale") == [(16, 0.5)]
    # the loss curve holds each step once, across the restore
    assert [r["step"] for r in json.loads(plot_file(Paths.at(root), "pretrain-encoder")
                                          .read_text())] == [10, 20, 30]


def test_non_finite_steps_that_outlast_the_remedy_stop_the_run_with_one_line(root, monkeypatch):
    rec = Recorder(monkeypatch, pretrain_encoder)
    nan_loss(monkeypatch, rec, range(13, 30), once=False)
    with pytest.raises(NonFiniteError) as err:
        _pretrain(root, "encoder.pretrain.steps=30", "encoder.pretrain.nonfinite_patience=3")
    assert isinstance(err.value, RaeError)
    assert str(err.value) == (
        "pretrain-encoder: loss or gradient norm not finite for 3 steps in a row at step 15, "
        "also after restoring step 10 with half the learning rate; the last good checkpoint "
        f"{root / 'ckpt' / 'last.pt'} is kept; check the inputs or lower encoder.pretrain.lr")
    assert rec.visits == [*range(16), *range(10, 16)]
    assert _metric(root, "nonfinite_steps")[-1] == (16, 6.0)


def test_without_a_fault_the_guard_changes_nothing(tmp_path, digits_root, monkeypatch, one_thread):
    def run(name: str) -> tuple[dict, list]:
        root = tmp_path / name
        root.mkdir()
        (root / "dataset").symlink_to(digits_root, target_is_directory=True)
        _pretrain(root, "encoder.pretrain.steps=20")
        weights = torch.load(Paths.at(root).encoder_dir / "encoder.pt", weights_only=True)
        return weights, [(r["step"], r["metrics"]) for r in _log(root) if "metrics" in r]

    guarded = run("guarded")
    monkeypatch.setattr(NonFiniteGuard, "finite", lambda self, *values: True)  # no checks
    unguarded = run("unguarded")
    assert guarded[1] == unguarded[1]
    assert guarded[0].keys() == unguarded[0].keys()
    assert all(torch.equal(guarded[0][k], unguarded[0][k]) for k in guarded[0])


def _encoder(root: Path) -> None:
    """The smoke preset's encoder, untrained: enough to have latents."""
    from rae_core.encoders import build_encoder
    from rae_core.store import atomic_save

    atomic_save(build_encoder("mae-micro", 32, random_init=True).state_dict(),
                Paths.at(root).encoder_dir / "encoder.pt")


def _generator_project(root: Path, monkeypatch) -> None:
    """An encoder, its statistics and latent shards, made in this process."""
    from rae_core import stages
    from rae_core.train import runner

    monkeypatch.setattr(runner, "map_shards", lambda fn, args, cfg, desc=None:
                        [fn(*a) for a in args])
    cfg = load_config(None, "smoke", ["data.root=dataset"])
    paths = Paths.at(root)
    _encoder(root)
    stages.stats(cfg, paths)
    stages.extract(cfg, paths)


def test_bf16_generator_skips_without_an_ema_update_and_is_remedied_in_fp32(root, monkeypatch,
                                                                            caplog):
    from rae_core.train import generator

    _generator_project(root, monkeypatch)
    rec = Recorder(monkeypatch, generator)
    autocast, pending, accumulate = [], {5, 9, 10}, generator.accumulate_gradients

    def poisoned(net, objective, batch, accum, distributed=False, bf16=False):
        autocast.append((rec.step, bf16))
        loss = accumulate(net, objective, batch, accum, distributed=distributed, bf16=bf16)
        if rec.step in pending:  # NaN gradients, the first time the step runs
            pending.discard(rec.step)
            for p in net.parameters():
                p.grad.mul_(NAN)
        return loss

    monkeypatch.setattr(generator, "accumulate_gradients", poisoned)
    cfg = load_config(None, "smoke", [
        "data.root=dataset", "generator.steps=12", "generator.batch_size=16",
        "generator.ckpt_every=4", "generator.sample_every=1000", "generator.precision=bf16",
        "generator.nonfinite_patience=2"])
    with caplog.at_level(logging.WARNING, "rae_core"):
        generator.train_loop({"cfg": cfg.to_dict(), "root": str(root),
                              "run_dir": str(root / "ckpt"), "fingerprint": "test"})
    assert rec.visits == [*range(11), *range(8, 12)]
    # the skipped step 5 changed neither the model nor its EMA; a finite one changes both
    assert _equal(rec.before(6), rec.before(5))
    assert not _equal({"ema": rec.before(5)["ema"]}, {"ema": rec.before(4)["ema"]})
    assert _equal(rec.before(8, visit=1), rec.before(8, visit=0))  # the step-8 checkpoint
    assert autocast == [(s, True) for s in range(11)] + [(s, False) for s in range(8, 12)]
    assert rec.lr(8, visit=1) == rec.lr(8, visit=0)  # the remedy was fp32, not the lr
    assert ("train-generator: 2 non-finite steps in a row at step 10 "
            "(generator.nonfinite_patience); restoring step 8 with autocast off (fp32)"
            ) in caplog.messages
    assert _metric(root, "nonfinite_steps", "train-generator") == [(6, 1.0), (10, 2.0),
                                                                   (11, 3.0)]
    assert (Paths.at(root).generator_dir / "ema.pt").exists()


def test_a_non_finite_discriminator_skips_the_decoder_step_too(root, monkeypatch):
    from rae_core import losses
    from rae_core.train import decoder

    _encoder(root)
    rec = Recorder(monkeypatch, decoder)
    hinge = losses.hinge_d_loss
    monkeypatch.setattr(losses, "hinge_d_loss", lambda real, fake: hinge(real, fake) *
                        (NAN if rec.step == 12 else 1.0))
    cfg = load_config(None, "smoke", ["data.root=dataset", "decoder.steps=16",
                                      "decoder.ckpt_every=8", "decoder.eval_every=16",
                                      "decoder.gan.disc_start_step=10",
                                      "decoder.gan.gen_start_step=11"])
    decoder.train_loop({"cfg": cfg.to_dict(), "root": str(root), "run_dir": str(root / "ckpt"),
                        "fingerprint": "test"})
    assert rec.visits == list(range(16))
    assert set(rec.before(12)) == {"model", "ema", "disc"}
    assert _equal(rec.before(13), rec.before(12))
    assert not _equal({"disc": rec.before(12)["disc"]}, {"disc": rec.before(11)["disc"]})
    assert _metric(root, "nonfinite_steps", "train-decoder") == [(13, 1.0)]


def test_the_guard_counts_only_steps_in_a_row():
    class Nothing:
        def metrics(self, *a, **k):
            pass

    guard = NonFiniteGuard("s", "sec", 2, None, {}, Nothing(), Nothing())
    finite, nan = torch.tensor(1.0), torch.tensor(NAN)
    for step, value in enumerate([nan, finite, nan, finite, torch.tensor(math.inf), finite]):
        if not guard.finite(value, finite):
            guard.skip(step)
    assert (guard.skipped, guard.streak, guard.remedy) == (3, 0, None)

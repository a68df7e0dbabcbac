"""Data-parallel training through DDP: two CPU workers (gloo, ray.num_workers=2 through
runner.fit on a local Ray) end every training stage with the weights that one worker reaches on
the same global batches, since each rank trains on its slice of the global batch with the
randomness one worker draws for those samples."""

import shutil
from pathlib import Path

import pytest
import torch

from rae_core.device import torch_threads
from rae_core.paths import Paths
from rae_core.presets import load_config
from rae_core.train import decoder, generator, pretrain_autoencoder, pretrain_encoder, runner

STEPS = 3


@pytest.fixture(scope="module")
def project(tmp_path_factory, digits_root):
    """The digits, an untrained smoke encoder, its statistics and latent shards."""
    from rae_core import stages
    from rae_core.encoders import build_encoder
    from rae_core.store import atomic_save

    root = tmp_path_factory.mktemp("ddp") / "project"
    root.mkdir()
    (root / "dataset").symlink_to(digits_root, target_is_directory=True)
    cfg, paths = load_config(None, "smoke", ["data.root=dataset"]), Paths.at(root)
    torch.manual_seed(0)
    atomic_save(build_encoder("mae-micro", 32, random_init=True).state_dict(),
                paths.encoder_dir / "encoder.pt")
    with pytest.MonkeyPatch.context() as mp:  # the shards in this process
        mp.setattr(runner, "map_shards", lambda fn, args, cfg, desc=None: [fn(*a) for a in args])
        stages.stats(cfg, paths)
        stages.extract(cfg, paths)
    return root


P = "encoder.pretrain"
# stage: (loop, smoke-preset overrides, modules, their optimisers)
STAGES = {
    "mae": (pretrain_encoder.train_loop,
            [f"{P}.steps={STEPS}", f"{P}.batch_size=16", f"{P}.ckpt_every=1"],
            ("model",), ("opt",)),
    "vae": (pretrain_autoencoder.train_loop,
            ["autoencoder.kind=vae", "encoder.name=vae-micro", f"{P}.steps={STEPS}",
             f"{P}.batch_size=16", f"{P}.ckpt_every=1"], ("model",), ("opt",)),
    "decoder": (decoder.train_loop,
                [f"decoder.steps={STEPS}", "decoder.batch_size=16", "decoder.ckpt_every=1",
                 f"decoder.eval_every={STEPS}", "decoder.gan.disc_start_step=0",
                 "decoder.gan.gen_start_step=1"], ("model", "ema", "disc"), ("opt", "opt_d")),
    "generator": (generator.train_loop,
                  [f"generator.steps={STEPS}", "generator.batch_size=16", "generator.grad_accum=2",
                   "generator.ckpt_every=1", "generator.sample_every=1000",
                   "generator.label_dropout=0"], ("model", "ema"), ("opt",)),
}


def _config(project: Path, stage: str, workers: int) -> tuple[dict, object]:
    """The loop's config for `stage` on `workers` workers, in a copy of the project of its own."""
    _, overrides, _, _ = STAGES[stage]
    root = project.parent / f"{stage}-w{workers}"
    shutil.copytree(project, root, symlinks=True)
    cfg = load_config(None, "smoke", ["data.root=dataset", f"ray.num_workers={workers}",
                                     *overrides])
    return {"cfg": cfg.to_dict(), "root": str(root), "run_dir": str(root / "ckpt"),
            "fingerprint": "test"}, cfg


@pytest.fixture(scope="module")
def two_workers(project, local_ray) -> dict[str, Path]:
    """Every stage on two workers in one runner.fit: one worker group (whose start-up is most
    of the time) runs the loops one after another. Their checkpoint folders by stage."""
    runs = {stage: _config(project, stage, 2) for stage in STAGES}
    loops = {stage: STAGES[stage][0] for stage in STAGES}

    def every_stage(config: dict) -> None:
        for stage, run in config["runs"].items():
            loops[stage](run)

    runner.fit("stages-test", every_stage, {"root": str(project),
                                            "runs": {k: c for k, (c, _) in runs.items()}},
               runs["mae"][1], project.parent / "ray")
    return {stage: Path(c["run_dir"]) for stage, (c, _) in runs.items()}


def _checkpoints(run_dir: Path) -> tuple[dict, dict]:
    """The last two checkpoints of a run: steps STEPS - 1 and STEPS."""
    return tuple(torch.load(run_dir / name, weights_only=True) for name in ("prev.pt", "last.pt"))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in tensors if v.is_floating_point()])


def _first_moments(opt_state: dict) -> torch.Tensor:
    """Adam's running mean of the gradients, over all parameters."""
    return _flat(opt_state["state"][i]["exp_avg"] for i in sorted(opt_state["state"]))


def _same_as_one_worker(project: Path, two_workers: dict, stage: str) -> None:
    """Two workers end where one does, up to float rounding, in the optimisers' running mean of
    the (averaged) gradients and in the weights. Weights within 5% of the last step's update:
    Adam moves every weight that has a gradient by about the learning rate, also one whose
    gradient is zero but for rounding (a bias before a normalisation), either way. A rank that
    trained on its own half alone is ~100% away."""
    loop, _, modules, optimisers = STAGES[stage]
    config, cfg = _config(project, stage, 1)
    with torch_threads(cfg.ray.cpus_per_worker):  # the loop pins it; the test's count after
        loop(config)  # one worker: in this process
    before, one = _checkpoints(Path(config["run_dir"]))
    two = _checkpoints(two_workers[stage])[1]
    assert before["step"] == STEPS - 1 and one["step"] == two["step"] == STEPS
    for name in optimisers:
        want = _first_moments(one[name])
        apart = (_first_moments(two[name]) - want).norm() / want.norm()
        assert apart < 1e-3, f"{stage} {name}: gradient means {apart:.2%} apart"
    for name in modules:
        assert one[name].keys() == two[name].keys()
        update = (_flat(one[name].values()) - _flat(before[name].values())).norm()
        apart = (_flat(two[name].values()) - _flat(one[name].values())).norm()
        assert update > 0, f"{stage} {name}: the last step changed nothing"
        assert apart < 0.05 * update, f"{stage} {name}: {apart / update:.2%} of the update apart"


def test_mae_pretraining(project, two_workers):
    _same_as_one_worker(project, two_workers, "mae")


def test_vae_pretraining(project, two_workers):
    _same_as_one_worker(project, two_workers, "vae")


def test_decoder_with_its_discriminator_and_adaptive_gan_weight(project, two_workers):
    _same_as_one_worker(project, two_workers, "decoder")


def test_generator_with_gradient_accumulation(project, two_workers):
    _same_as_one_worker(project, two_workers, "generator")

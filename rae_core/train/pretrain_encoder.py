"""The pretrain-encoder stage: a small MAE pretrained on the training images (75% masking),
for machines without pretrained encoder weights. Its frozen encoder then defines the latents."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rae_core.config import Config, from_dict
from rae_core.data.folder import ImageSource
from rae_core.data.loader import step_loader
from rae_core.paths import Paths
from rae_core.plots import LossCurve, write_empty
from rae_core.store import atomic_save
from rae_core.train.common import (
    Checkpointer,
    MetricsLog,
    NonFiniteGuard,
    Objective,
    data_parallel,
    grad_norm,
    local_batch,
    set_lr,
    warmup_cosine,
)
from rae_core.train.sampler import BatchDraws, step_seed

log = logging.getLogger(__name__)


def train_loop(config: dict) -> dict:
    """One worker's loop. On W workers (DDP) each rank trains on its 1/W of the same global
    batch, with the masks and flips that one worker would draw for those samples (BatchDraws),
    so W workers reach one worker's weights up to float rounding; rank 0 checkpoints."""
    from rae_core.encoders import build_encoder
    from rae_core.train.runner import worker_setup

    cfg, paths, run_dir = from_dict(config["cfg"]), Paths.at(config["root"]), Path(config["run_dir"])
    rank, world, device = worker_setup(cfg)
    p = cfg.encoder.pretrain
    local_batch(p.batch_size, world, "encoder.pretrain.batch_size")
    torch.manual_seed(cfg.seed)
    source = step_loader(ImageSource(paths.dataset(cfg.data.root), "train", cfg.data.resolution,
                                     cfg.data.max_in_memory), cfg, device, p.batch_size, p.steps,
                         rank, world)
    mae = build_encoder(cfg.encoder.name, cfg.data.resolution, random_init=True).to(device)
    mae.train().requires_grad_(True)
    opt = torch.optim.AdamW(mae.parameters(), lr=p.lr, betas=(0.9, 0.95),
                            weight_decay=p.weight_decay)
    metrics = MetricsLog(paths.metrics_log("pretrain-encoder"), enabled=rank == 0)
    ckpt = Checkpointer(run_dir, config["fingerprint"], "pretrain-encoder")
    states = {"model": mae, "opt": opt}
    start = ckpt.resume(**states)
    if start:
        metrics.event(start, f"resumed at step {start}")
    curve = LossCurve(paths, "pretrain-encoder", run_dir, start, enabled=rank == 0)
    guard = NonFiniteGuard("pretrain-encoder", "encoder.pretrain", p.nonfinite_patience, ckpt,
                           states, metrics, curve, world=world)
    net = data_parallel(Objective(mae, lambda m, *a, **k: m.mae_loss(*a, **k)), world, device)
    loss = torch.zeros(())
    for step in guard.steps(start, p.steps):
        torch.manual_seed(step_seed(cfg.seed, step, rank))  # anything drawn without `draws`
        draws = BatchDraws(cfg.seed, step, rank, world)
        x, _ = source.get(step, draws)
        loss = net(x.to(device), mask_ratio=p.mask_ratio, generator=draws)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients
        if not guard.finite(loss, grad_norm(mae)):
            guard.skip(step)
            continue
        lr = guard.lr_scale * warmup_cosine(step, p.lr, p.lr * 0.1, p.warmup_steps, p.steps)
        set_lr(opt, lr)
        opt.step()
        done = step + 1
        if done % 10 == 0 or done == p.steps:
            metrics.metrics(done, mae_loss=loss.item(), lr=lr)
            curve.add(done, loss.item())
        if rank == 0 and (done % p.ckpt_every == 0 or done == p.steps):
            ckpt.save(done, **states)
            curve.write()
    curve.write()
    if rank == 0:
        atomic_save(mae.state_dict(), paths.encoder_dir / "encoder.pt")
    return {"steps": p.steps, "resumed_at": start, "final_mae_loss": float(loss)}


def run(cfg: Config, paths: Paths) -> dict:
    from rae_core.autoencoder import needs_pretraining
    from rae_core.store import write_json
    from rae_core.train.runner import fit

    paths.encoder_dir.mkdir(parents=True, exist_ok=True)
    if not needs_pretraining(cfg):
        weights = "keeps its untrained weights (encoder.random_init)" if cfg.encoder.random_init \
            else f"uses pretrained weights ({cfg.encoder.weights or 'local hub cache'})"
        info = {"skipped": True, "reason": f"encoder {cfg.encoder.name} {weights}"}
        write_json(paths.encoder_dir / "summary.json", info)
        write_empty(paths, "pretrain-encoder")
        return info
    fp = cfg.fingerprint("data", "encoder", "seed")
    run_dir = paths.checkpoints / f"pretrain-encoder-{fp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = fit(f"pretrain-encoder-{fp}", train_loop,
                  {"cfg": cfg.to_dict(), "root": str(paths.root), "run_dir": str(run_dir),
                   "fingerprint": fp}, cfg, paths.ray_storage)
    write_json(paths.encoder_dir / "summary.json", summary)
    return summary

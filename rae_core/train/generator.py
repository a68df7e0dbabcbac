"""The train-generator stage: the configured generator (rae_core.generator) on normalised
latents: DiT / DiT-DH by flow matching, DiT/2 by IDDPM diffusion, or VAR / HART on a hybrid-vq
tokenizer's tokens.

Runs in Ray Train workers (data parallel). The global batch is split across workers and
gradient-accumulation micro-batches; gradients are zeroed once per optimiser step, so an
accumulated step equals the large-batch step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from rae_core.autoencoder import load_decoder, load_encoder, load_stats, stats_identity
from rae_core.config import Config, from_dict
from rae_core.data.latents import OnlineSource, ShardSource
from rae_core.data.loader import step_loader
from rae_core.models import model_flops_per_image
from rae_core.paths import Paths
from rae_core.plots import LossCurve
from rae_core.store import atomic_save
from rae_core.throughput import figures, peak_flops, report
from rae_core.train.common import (
    EMA,
    Checkpointer,
    MetricsLog,
    NonFiniteGuard,
    data_parallel,
    global_mean,
    local_batch,
    prune_snapshots,
    set_lr,
    warmup_constant_linear,
)
from rae_core.train.sampler import BatchDraws, step_seed

log = logging.getLogger(__name__)


def make_source(cfg: Config, paths: Paths, encoder, stats, device):
    if cfg.generator.latents == "shards":
        return ShardSource(paths.latents_dir, stats, stats_identity(cfg, encoder),
                           hflip=cfg.data.hflip)
    from rae_core.data.folder import ImageFolderDataset

    ds = ImageFolderDataset(paths.dataset(cfg.data.root), "train", cfg.data.resolution)
    return OnlineSource(ds, encoder, stats, device, hflip=cfg.data.hflip)


def accumulate_gradients(net: torch.nn.Module, objective, batch: tuple[torch.Tensor, ...],
                         accum: int, distributed: bool = False,
                         bf16: bool = False) -> torch.Tensor:
    """Backward over `accum` equal micro-batches of (x, y, noise, t); returns the batch loss.

    Each micro-loss is scaled by 1/accum and gradients are zeroed only by the caller, so the
    summed gradients equal those of the whole batch. DDP synchronises on the last one only.
    """
    x, y, noise, t = batch
    micro = len(x) // accum
    total = torch.zeros((), device=x.device)
    for k in range(accum):
        sl = slice(k * micro, (k + 1) * micro)
        sync = not distributed or k == accum - 1
        with contextlib.nullcontext() if sync else net.no_sync():
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = objective.loss(net, x[sl], y[sl], noise=noise[sl], t=t[sl]) / accum
            loss.backward()
        total += loss.detach()
    return total


def train_loop(config: dict) -> dict:
    """One Ray Train worker's loop; rank 0 checkpoints, logs and writes the EMA model.

    On W workers the generator is a DDP module: each rank trains on its 1/W of the same global
    batch with the noise, times and flips one worker would draw for those samples
    (BatchDraws), and gradient accumulation synchronises only its last micro-batch, so W
    workers reach one worker's weights up to float rounding. Not yet so: draws made inside a
    model from the global generator (the label dropout of the DiT family, VAR's and HART's
    masks), which are drawn per rank. The EMA follows the unwrapped model.
    """
    from rae_core.generator import (
        build_generator,
        checkpoint_meta,
        latent_shift,
        objective,
        token_space,
    )
    from rae_core.train.runner import worker_setup

    cfg, paths, run_dir = from_dict(config["cfg"]), Paths.at(config["root"]), Path(config["run_dir"])
    rank, world, device = worker_setup(cfg)
    d = cfg.generator
    # AutoGuidance's weak model trains under its own name, into its own folder
    stage = config.get("stage", "train-generator")
    out_dir = Path(config.get("out_dir") or paths.generator_dir)
    local_batch(d.batch_size, world, "generator.batch_size")
    torch.manual_seed(cfg.seed)
    encoder = load_encoder(cfg, paths, device)
    stats = load_stats(cfg, paths, encoder)
    source = step_loader(make_source(cfg, paths, encoder, stats, device), cfg, device,
                         d.batch_size, d.steps, rank, world)
    latent_shape = tuple(encoder.latent_shape)
    model = build_generator(cfg, latent_shape, token_space(cfg, paths, encoder)).to(device)
    meta = checkpoint_meta(model)
    ema = EMA(model, d.ema)
    # fused AdamW on the GPU: one kernel for all parameters (measured +10% step speed at XL)
    opt = torch.optim.AdamW(model.parameters(), lr=d.lr, betas=tuple(d.betas),
                            weight_decay=d.weight_decay, fused=device.type == "cuda")
    metrics = MetricsLog(paths.metrics_log(stage), enabled=rank == 0)
    ckpt = Checkpointer(run_dir, config["fingerprint"], stage)
    states = {"model": model, "ema": ema.model, "opt": opt}
    start = ckpt.resume(**states)
    if start:
        metrics.event(start, f"resumed at step {start}")
    curve = LossCurve(paths, stage, run_dir, start, enabled=rank == 0)
    guard = NonFiniteGuard(stage, "generator", d.nonfinite_patience, ckpt, states,
                           metrics, curve, bf16=d.precision == "bf16", world=world)
    loss_fn = objective(cfg, latent_shape)
    net = data_parallel(model, world, device)
    if d.compile and device.type == "cuda":
        net = torch.compile(net)
    decoder = None  # loaded at the first preview grid: train-decoder may run alongside
    step_loss = torch.full((), float("nan"))  # stays NaN only when resuming a finished run
    t0 = time.perf_counter()
    for step in guard.steps(start, d.steps):
        torch.manual_seed(step_seed(cfg.seed, step, rank))  # what models draw themselves
        draws = BatchDraws(cfg.seed, step, rank, world)
        x, y = source.get(step, draws)
        x, y = x.to(device), y.to(device)
        noise = draws.rows(len(x), lambda m, g, shape=x.shape[1:]: torch.randn(m, *shape,
                                                                              generator=g))
        noise = noise.to(device)
        t = draws.rows(len(x), lambda m, g: loss_fn.sample_time(m, generator=g)).to(device)
        opt.zero_grad(set_to_none=True)
        step_loss = accumulate_gradients(net, loss_fn, (x, y, noise, t), d.grad_accum,
                                         distributed=world > 1, bf16=guard.bf16)
        clip = d.grad_clip if d.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if not guard.finite(step_loss, grad_norm):
            guard.skip(step)
            continue
        lr = guard.lr_scale * warmup_constant_linear(step, d.lr, d.min_lr, d.warmup_steps,
                                                     d.decay_start_step, d.steps)
        set_lr(opt, lr)
        opt.step()
        ema.update(model)
        step_loss = global_mean(step_loss, world)
        done = step + 1
        if done % 10 == 0 or done == d.steps:
            terms = {k: float(v) for k, v in getattr(loss_fn, "terms", {}).items()}
            metrics.metrics(done, loss=step_loss.item(), lr=lr, grad_norm=float(grad_norm),
                            **terms)
            curve.add(done, step_loss.item())
        if rank == 0 and (done % d.ckpt_every == 0 or done == d.steps):
            atomic_save({"model": ema.model.state_dict(), "step": done, "name": d.model,
                         "overrides": cfg.generator.overrides(), "latent_shape": list(latent_shape),
                         **meta}, run_dir / f"ema-step{done:07d}.pt")
            prune_snapshots(run_dir, d.keep_snapshots)
            ckpt.save(done, **states)
            curve.write()
        if rank == 0 and (done % d.sample_every == 0 or done == d.steps):
            decoder = decoder or _optional_decoder(cfg, paths, encoder, device)
            if decoder is not None:
                path = _sample_grid(cfg, ema.model, decoder, stats, latent_shape, done, run_dir)
                metrics.artifact(done, path)
    curve.write()
    seconds = time.perf_counter() - t0
    shift = latent_shift(cfg, latent_shape) if d.kind == "flow" else None
    summary = {"steps": d.steps, "resumed_at": start, "shift": shift,
               "final_loss": float(step_loss), "params": sum(p.numel() for p in model.parameters())}
    # the registry counts DiT / DiT-DH FLOPs (forward + backward ~ 3x forward); not VAR / HART
    flops = 3 * model_flops_per_image(d.model, latent_shape[0], latent_shape[1],
                                      **d.overrides()) \
        if d.kind != "hart" and peak_flops(device) else None
    summary.update(figures((d.steps - start) * d.batch_size, seconds, flops, device, world))
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_save({"model": ema.model.state_dict(), "step": d.steps, "name": d.model,
                     "overrides": cfg.generator.overrides(), "latent_shape": list(latent_shape),
                     "shift": shift, **meta}, out_dir / "ema.pt")
    return summary


def _optional_decoder(cfg, paths, encoder, device):
    """The decoder for preview grids, when train-decoder has finished one under this
    configuration; a decoder another configuration left is passed over with a warning."""
    from rae_core import provenance

    if not (paths.decoder_dir / "decoder.pt").exists():
        return None
    decision = provenance.decide("train-decoder", cfg, paths)
    if decision.run:  # still training beside this stage (no record yet), or made by another
        unfinished = not provenance.record_path(paths, "train-decoder").exists()
        (log.info if unfinished else log.warning)(
            "train-generator: no preview grids from %s: %s", paths.decoder_dir, decision.reason)
        return None
    return load_decoder(cfg, paths, encoder, device)


@torch.no_grad()
def _sample_grid(cfg, model, decoder, stats, latent_shape, step, run_dir) -> Path:
    from rae_core.generator import sample_latents
    from rae_core.images import grid, save_png
    from rae_core.sampling import balanced_labels

    n_cls = min(cfg.data.num_classes, 10)
    y = balanced_labels(4, n_cls)
    g = torch.Generator().manual_seed(cfg.seed + 17)
    noise = torch.randn((len(y), *latent_shape), generator=g)
    device = next(model.parameters()).device
    z = sample_latents(cfg, model, y.to(device), latent_shape, noise, guidance="none",
                       generator=g)
    images = decoder(stats.denormalize(z)).clamp(0, 1)
    order = torch.arange(len(y)).view(n_cls, 4).t().reshape(-1)  # one row per draw, class cols
    return save_png(grid(images[order], nrow=n_cls), run_dir / f"samples-step{step:07d}.png",
                    upscale=2)


def checkpoint_dir(cfg: Config, paths: Paths) -> Path:
    """Where this configuration's checkpoints live (so the same config resumes)."""
    from rae_core.generator import SECTIONS

    return paths.checkpoints / f"train-generator-{cfg.fingerprint(*SECTIONS)}"


def run(cfg: Config, paths: Paths, stage: str = "train-generator",
        out_dir: Path | None = None) -> dict:
    """The stage: fit on Ray, keyed by the configuration so a re-run resumes; the EMA model
    goes to out_dir/ema.pt (models/generator/ when None)."""
    from rae_core.generator import SECTIONS
    from rae_core.train.runner import fit

    fp = cfg.fingerprint(*SECTIONS)
    run_dir = checkpoint_dir(cfg, paths)
    run_dir.mkdir(parents=True, exist_ok=True)
    loop_cfg = {"cfg": cfg.to_dict(), "root": str(paths.root), "run_dir": str(run_dir),
                "fingerprint": fp, "stage": stage, "out_dir": str(out_dir or paths.generator_dir)}
    summary = fit(f"train-generator-{fp}", train_loop, loop_cfg, cfg, paths.ray_storage)
    summary["checkpoint_dir"] = str(run_dir)
    report(stage, summary)
    return summary

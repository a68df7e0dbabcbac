"""The train-decoder stage: the RAE decoder on noise-augmented latents of the frozen encoder,
with L1 + LPIPS + an adaptively weighted GAN loss. The same loop fine-tunes a VAE's decoder and
trains a hybrid-vq tokenizer's decoder on its discrete or hybrid latent (HART's phase 2).

The discriminator starts learning at gan.disc_start_step and the generator's GAN term joins at
gan.gen_start_step; its weight lambda = ||grad L_rec|| / ||grad L_gan|| on the decoder's last
layer is computed in fp32 outside autocast.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

import torch

from rae_core.autoencoder import autoencoder_macs, build_decoder_for, load_encoder
from rae_core.config import Config, from_dict
from rae_core.data.folder import ImageSource, to_unit
from rae_core.data.loader import step_loader
from rae_core.paths import Paths
from rae_core.plots import LossCurve, write_empty
from rae_core.store import atomic_save, write_json
from rae_core.throughput import figures, peak_flops, report
from rae_core.train.common import (
    EMA,
    Checkpointer,
    MetricsLog,
    NonFiniteGuard,
    data_parallel,
    global_mean,
    grad_norm,
    local_batch,
    set_lr,
    warmup_cosine,
)
from rae_core.train.sampler import BatchDraws, step_seed

log = logging.getLogger(__name__)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """Fakes as the discriminator would see saved images: clamped, 8-bit."""
    return x.clamp(0, 1).mul(255).round().div(255)


@torch.no_grad()
def evaluate_reconstruction(encoder, decoder, images: torch.Tensor, batch: int = 256) -> dict:
    from rae_core.metrics import psnr

    decoder.eval()
    recs = torch.cat([decoder(encoder.encode(images[i: i + batch])).clamp(0, 1)
                      for i in range(0, len(images), batch)])
    out = {"val_psnr": float(psnr(recs, images)), "val_l1": float((recs - images).abs().mean())}
    if hasattr(decoder, "discrete"):  # a hybrid tokenizer: also from its discrete tokens alone
        recs = torch.cat([decoder(decoder.discrete(encoder.encode(images[i: i + batch])))
                          .clamp(0, 1) for i in range(0, len(images), batch)])
        out["val_psnr_discrete"] = float(psnr(recs, images))
    return out


def validation_images(cfg: Config, paths: Paths, count: int = 512) -> torch.Tensor:
    """Up to `count` validation images spread evenly over the (class-sorted) split."""
    val = ImageSource(paths.dataset(cfg.data.root), "val", cfg.data.resolution,
                      cfg.data.max_in_memory)
    return to_unit(val.read(torch.linspace(0, len(val) - 1, min(count, len(val))).long())[0])


def save_decoder(cfg: Config, paths: Paths, encoder, decoder, summary: dict) -> None:
    paths.decoder_dir.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": decoder.state_dict(), "name": cfg.decoder.model,
                 "latent_shape": list(encoder.latent_shape), "noise_tau": cfg.decoder.noise_tau},
                paths.decoder_dir / "decoder.pt")
    write_json(paths.decoder_dir / "metrics.json", summary)


def train_loop(config: dict) -> dict:
    """One worker's loop. On W workers the decoder and the discriminator are each a DDP module
    with its own optimiser; each rank trains on its 1/W of the same global batch with the
    decoder noise, flips and DiffAug draws one worker would make for those samples
    (BatchDraws), and the adaptive GAN weight is measured on the global batch's last-layer
    gradients, so W workers reach one worker's weights up to float rounding. Rank 0
    checkpoints, evaluates and writes the EMA decoder."""
    from rae_core.discriminator import build_discriminator
    from rae_core.images import grid, save_png
    from rae_core.losses import (
        LPIPSLoss,
        adaptive_gan_weight,
        diff_augment,
        generator_loss,
        hinge_d_loss,
    )
    from rae_core.train.runner import worker_setup

    cfg, paths, run_dir = from_dict(config["cfg"]), Paths.at(config["root"]), Path(config["run_dir"])
    rank, world, device = worker_setup(cfg)
    d, g = cfg.decoder, cfg.decoder.gan
    local_batch(d.batch_size, world, "decoder.batch_size")
    torch.manual_seed(cfg.seed)
    source = step_loader(ImageSource(paths.dataset(cfg.data.root), "train", cfg.data.resolution,
                                     cfg.data.max_in_memory), cfg, device, d.batch_size, d.steps,
                         rank, world)
    val_images = validation_images(cfg, paths)
    encoder = load_encoder(cfg, paths, device)
    decoder = build_decoder_for(cfg, paths, encoder).to(device)
    disc = build_discriminator(g.disc, weights=g.disc_weights).to(device)
    lpips = LPIPSLoss(weights=d.lpips_weights).to(device) if d.lpips_weight > 0 else None
    ema = EMA(decoder, d.ema)
    opt = torch.optim.AdamW(decoder.parameters(), lr=d.lr, betas=tuple(d.betas),
                            weight_decay=d.weight_decay)
    disc_params = [p for p in disc.parameters() if p.requires_grad]
    opt_d = torch.optim.AdamW(disc_params, lr=g.disc_lr, betas=tuple(d.betas), weight_decay=0.0)
    metrics = MetricsLog(paths.metrics_log("train-decoder"), enabled=rank == 0)
    ckpt = Checkpointer(run_dir, config["fingerprint"], "train-decoder")
    states = {"model": decoder, "ema": ema.model, "opt": opt, "disc": disc, "opt_d": opt_d}
    start = ckpt.resume(**states)
    if start:
        metrics.event(start, f"resumed at step {start}")
    curve = LossCurve(paths, "train-decoder", run_dir, start, enabled=rank == 0)
    guard = NonFiniteGuard("train-decoder", "decoder", d.nonfinite_patience, ckpt, states,
                           metrics, curve, world=world)
    # Each its own DDP module with its own optimiser. The generator's loss uses the plain
    # discriminator: the gradients it leaves there are discarded, so nothing to average.
    net, disc_net = data_parallel(decoder, world, device), data_parallel(disc, world, device)
    noise_draws = "generator" in inspect.signature(decoder.forward).parameters
    average = (lambda grad: global_mean(grad, world)) if world > 1 else None
    zero = torch.zeros((), device=device)
    t0 = time.perf_counter()
    for step in guard.steps(start, d.steps):
        torch.manual_seed(step_seed(cfg.seed, step, rank))  # anything drawn without `draws`
        draws = BatchDraws(cfg.seed, step, rank, world)
        x, _ = source.get(step, draws)
        x = x.to(device)
        with torch.no_grad():
            z = encoder.encode(x)
        decoder.train()
        rec = net(z, generator=draws) if noise_draws else net(z)
        l1 = (rec - x).abs().mean()
        lp = lpips(rec, x).mean() if lpips is not None else torch.zeros((), device=device)
        rec_loss = l1 + d.lpips_weight * lp
        gan_loss, lam = torch.zeros((), device=device), torch.zeros((), device=device)
        if step >= g.gen_start_step and g.weight > 0:
            fake = diff_augment(rec, draws) if g.diffaug else rec
            gan_loss = generator_loss(disc(fake))
            lam = adaptive_gan_weight(rec_loss, gan_loss, decoder.last_layer_weight,
                                      average=average)
        loss = rec_loss + g.weight * lam * gan_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the decoder's gradients
        # the discriminator's gradients too before any update: a step updates both or neither
        disc_step = step >= g.disc_start_step
        d_loss, d_norm = zero, zero
        if disc_step:
            real, fake = x, _quantise(rec.detach())
            if g.diffaug:
                real, fake = diff_augment(real, draws), diff_augment(fake, draws)
            d_loss = hinge_d_loss(disc_net(real), disc_net(fake))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()  # and here the discriminator's
            d_norm = grad_norm(disc)
        if not guard.finite(loss, grad_norm(decoder), d_loss, d_norm):
            guard.skip(step)
            continue
        lr = guard.lr_scale * warmup_cosine(step, d.lr, d.min_lr, d.warmup_steps, d.steps)
        set_lr(opt, lr)
        opt.step()
        ema.update(decoder)
        if disc_step:
            set_lr(opt_d, guard.lr_scale * g.disc_lr)
            opt_d.step()
        done = step + 1
        if done % 10 == 0 or done == d.steps:
            with torch.no_grad():
                mse = ((rec.detach().clamp(0, 1) - x) ** 2).flatten(1).mean(1)
                batch_psnr = (-10 * torch.log10(mse.clamp_min(1e-10))).mean()
            metrics.metrics(done, l1=l1.item(), lpips=lp.item(), gan_loss=gan_loss.item(),
                            gan_lambda=float(lam), disc_loss=d_loss.item(),
                            psnr=batch_psnr.item(), lr=lr)
            curve.add(done, loss.item())
        if rank == 0 and (done % d.ckpt_every == 0 or done == d.steps):
            ckpt.save(done, **states)
            curve.write()
        if rank == 0 and (done % d.eval_every == 0 or done == d.steps):
            vx = val_images[:256].to(device)
            ev = evaluate_reconstruction(encoder, ema.model, vx)
            metrics.metrics(done, **ev)
            with torch.no_grad():
                shown = vx[torch.linspace(0, len(vx) - 1, 16).long()]  # across classes
                recs = ema.model(encoder.encode(shown)).clamp(0, 1)
            path = save_png(grid(torch.cat([shown, recs]), nrow=16),
                            run_dir / f"reconstructions-step{done:07d}.png", upscale=2)
            metrics.artifact(done, path)
    curve.write()
    seconds = time.perf_counter() - t0
    summary: dict = {"steps": d.steps, "resumed_at": start}
    # a step encodes with the frozen encoder (forward only) and trains the decoder (~3x)
    flops = None
    if peak_flops(device):
        enc_macs, dec_macs = autoencoder_macs(cfg)
        flops = 2 * (enc_macs + 3 * dec_macs)
    summary.update(figures((d.steps - start) * d.batch_size, seconds, flops, device, world))
    if rank == 0:
        summary.update(evaluate_reconstruction(encoder, ema.model, val_images.to(device)))
        save_decoder(cfg, paths, encoder, ema.model, summary)
    return summary


def keep_vae_decoder(cfg: Config, paths: Paths) -> dict:
    """A VAE without decoder fine-tuning: its own decoder becomes the stage's output as it is,
    measured on the validation images like a trained one (no Ray workers needed)."""
    encoder = load_encoder(cfg, paths)
    decoder = build_decoder_for(cfg, paths, encoder).eval()
    summary = {"steps": 0, "finetuned": False,
               **evaluate_reconstruction(encoder, decoder, validation_images(cfg, paths))}
    save_decoder(cfg, paths, encoder, decoder, summary)
    write_empty(paths, "train-decoder")
    return summary


def run(cfg: Config, paths: Paths) -> dict:
    from rae_core.train.runner import fit

    if cfg.autoencoder.kind == "vae" and not cfg.autoencoder.finetune_decoder:
        return keep_vae_decoder(cfg, paths)

    fp = cfg.fingerprint("data", "autoencoder", "encoder", "decoder", "seed")
    run_dir = paths.checkpoints / f"train-decoder-{fp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = fit(f"train-decoder-{fp}", train_loop,
                  {"cfg": cfg.to_dict(), "root": str(paths.root), "run_dir": str(run_dir),
                   "fingerprint": fp}, cfg, paths.ray_storage)
    summary["checkpoint_dir"] = str(run_dir)
    report("train-decoder", summary)
    return summary

"""The pretrain-encoder stage for autoencoder.kind = vae: a whole AutoencoderKL trained on the
training images, as the KL-f8 autoencoder of latent diffusion was, when no weights are given.

Loss: L1 + kl_weight * KL of the sampled posterior, plus LPIPS and the adaptively weighted GAN of
the train-decoder stage where decoder.lpips_weight / decoder.gan.weight switch them on. LDM sums
the reconstruction error over pixels beside a per-image KL; here both are per pixel (KL / pixel
count), which keeps autoencoder.kl_weight on SD's scale (1e-6). Hyper-parameters come from
encoder.pretrain; the result is a diffusers folder models/encoder/vae/.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from rae_core.config import Config, from_dict
from rae_core.data.folder import ImageSource
from rae_core.paths import Paths
from rae_core.train.common import (
    Checkpointer,
    MetricsLog,
    average_gradients,
    check_finite,
    set_lr,
    warmup_cosine,
    write_json,
)
from rae_core.train.sampler import batch_indices, rank_slice, step_seed

log = logging.getLogger(__name__)


def train_loop(config: dict) -> dict:
    from rae_core.discriminator import build_discriminator
    from rae_core.images import grid, save_png
    from rae_core.losses import (
        LPIPSLoss,
        adaptive_gan_weight,
        diff_augment,
        generator_loss,
        hinge_d_loss,
    )
    from rae_core.train.decoder import evaluate_reconstruction
    from rae_core.train.runner import worker_setup
    from rae_core.vae import build_vae, pretrained_dir, save_vae, vae_parts

    cfg, paths, run_dir = from_dict(config["cfg"]), Paths.at(config["root"]), Path(config["run_dir"])
    rank, world, device = worker_setup(cfg)
    p, d, g = cfg.encoder.pretrain, cfg.decoder, cfg.decoder.gan
    torch.manual_seed(cfg.seed)
    root = paths.dataset(cfg.data.root)
    source = ImageSource(root, "train", cfg.data.resolution)
    val = ImageSource(root, "val", cfg.data.resolution)
    pick = torch.linspace(0, len(val) - 1, min(512, len(val))).long()  # spread over classes
    val_images = val.images[pick] if val.images is not None else \
        torch.stack([val.dataset[int(i)][0] for i in pick])
    vae = build_vae(cfg.encoder.name).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=p.lr, betas=(0.9, 0.95),
                            weight_decay=p.weight_decay)
    lpips = LPIPSLoss(weights=d.lpips_weights).to(device) if d.lpips_weight > 0 else None
    # The GAN only where it would act within these steps (a dino disc needs weights to build).
    use_gan = g.weight > 0 and min(g.disc_start_step, g.gen_start_step) < p.steps
    states: dict = {"model": vae, "opt": opt}
    if use_gan:
        disc = build_discriminator(g.disc, weights=g.disc_weights).to(device)
        opt_d = torch.optim.AdamW([q for q in disc.parameters() if q.requires_grad],
                                  lr=g.disc_lr, betas=(0.9, 0.95), weight_decay=0.0)
        states.update(disc=disc, opt_d=opt_d)
    metrics = MetricsLog(paths.metrics_log("pretrain-encoder"), enabled=rank == 0)
    ckpt = Checkpointer(run_dir, config["fingerprint"], "pretrain-encoder")
    start = ckpt.resume(**states)
    if start:
        metrics.event(start, f"resumed at step {start}")
    zero = torch.zeros((), device=device)
    for step in range(start, p.steps):
        torch.manual_seed(step_seed(cfg.seed, step, rank))  # also draws the posterior sample
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, rank))
        idx = rank_slice(batch_indices(len(source), p.batch_size, cfg.seed, step), rank, world)
        x, _ = source.get(idx, gen)
        x = x.to(device)
        posterior = vae.encode(x * 2 - 1).latent_dist
        rec = vae.decode(posterior.sample()).sample * 0.5 + 0.5
        l1 = (rec - x).abs().mean()
        kl = posterior.kl().mean()  # nats per image, summed over the latent
        lp = lpips(rec, x).mean() if lpips is not None else zero
        rec_loss = l1 + d.lpips_weight * lp
        gan_loss, lam = zero, zero
        if use_gan and step >= g.gen_start_step:
            gan_loss = generator_loss(disc(diff_augment(rec) if g.diffaug else rec))
            lam = adaptive_gan_weight(rec_loss, gan_loss, vae.decoder.conv_out.weight)
        loss = rec_loss + cfg.autoencoder.kl_weight * kl / x[0].numel() + g.weight * lam * gan_loss
        check_finite(loss.detach(), step, "pretrain-encoder", ckpt.last_good)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(vae, world)
        lr = warmup_cosine(step, p.lr, p.lr * 0.1, p.warmup_steps, p.steps)
        set_lr(opt, lr)
        opt.step()
        d_loss = zero
        if use_gan and step >= g.disc_start_step:
            real, fake = x, rec.detach().clamp(0, 1).mul(255).round().div(255)  # as saved
            if g.diffaug:
                real, fake = diff_augment(real), diff_augment(fake)
            d_loss = hinge_d_loss(disc(real), disc(fake))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            average_gradients(disc, world)
            opt_d.step()
        done = step + 1
        if done % 10 == 0 or done == p.steps:
            with torch.no_grad():
                mse = ((rec.detach().clamp(0, 1) - x) ** 2).flatten(1).mean(1)
                psnr = (-10 * torch.log10(mse.clamp_min(1e-10))).mean()
            extra = dict(lpips=lp.item()) if lpips is not None else {}
            if use_gan:
                extra.update(gan_loss=gan_loss.item(), gan_lambda=float(lam),
                             disc_loss=d_loss.item())
            metrics.metrics(done, l1=l1.item(), kl=kl.item(), psnr=psnr.item(), lr=lr, **extra)
        if rank == 0 and (done % p.ckpt_every == 0 or done == p.steps):
            ckpt.save(done, **states)
    summary: dict = {"steps": p.steps, "resumed_at": start}
    if rank == 0:
        encoder, decoder = vae_parts(cfg.encoder.name, vae.eval(), cfg.data.resolution)
        vx = val_images.to(device)
        ev = evaluate_reconstruction(encoder, decoder, vx)
        metrics.metrics(p.steps, **ev)
        summary.update(ev)
        with torch.no_grad():
            shown = vx[torch.linspace(0, len(vx) - 1, 16).long()]  # across classes
            recs = decoder(encoder.encode(shown)).clamp(0, 1)
        metrics.artifact(p.steps, save_png(grid(torch.cat([shown, recs]), nrow=16),
                                           run_dir / "reconstructions.png", upscale=2))
        save_vae(vae, pretrained_dir(paths))
    return summary


def fingerprint(cfg: Config) -> str:
    """What the trained VAE depends on: its own sections and the losses it borrows from the
    decoder stage (LPIPS, GAN), not the rest of that stage (noise, steps)."""
    decoder = cfg.to_dict()["decoder"]
    losses = {k: decoder[k] for k in ("lpips_weight", "lpips_weights", "gan")}
    own = cfg.fingerprint("data", "encoder", "autoencoder", "seed")
    return hashlib.sha256(json.dumps([own, losses], sort_keys=True).encode()).hexdigest()[:12]


def run(cfg: Config, paths: Paths) -> dict:
    """Train the VAE that encoder.name registers, unless encoder.weights gives one; writes
    models/encoder/vae/ and models/encoder/summary.json."""
    from rae_core.train.runner import fit

    paths.encoder_dir.mkdir(parents=True, exist_ok=True)
    if cfg.encoder.weights is not None:
        info = {"skipped": True, "reason": f"VAE {cfg.encoder.name} uses the given weights "
                f"{cfg.encoder.weights}"}
        write_json(paths.encoder_dir / "summary.json", info)
        return info
    fp = fingerprint(cfg)
    run_dir = paths.checkpoints / f"pretrain-encoder-{fp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = fit(f"pretrain-encoder-{fp}", train_loop,
                  {"cfg": cfg.to_dict(), "root": str(paths.root), "run_dir": str(run_dir),
                   "fingerprint": fp}, cfg, paths.ray_storage)
    write_json(paths.encoder_dir / "summary.json", summary)
    return summary

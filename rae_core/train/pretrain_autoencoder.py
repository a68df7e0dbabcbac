"""The pretrain-encoder stage for a whole autoencoder trained on the training images when no
weights are given: an AutoencoderKL (autoencoder.kind = vae), as the KL-f8 autoencoder of latent
diffusion was, or HART's multi-scale VQ tokenizer (hybrid-vq), as VAR's was (HART's phase 1).

Loss: L1 + a regulariser, plus LPIPS and the adaptively weighted GAN of the train-decoder stage
where decoder.lpips_weight / decoder.gan.weight switch them on.
- vae: kl_weight * KL of the sampled posterior. LDM sums the reconstruction error over pixels
  beside a per-image KL; here both are per pixel (KL / pixel count), which keeps
  autoencoder.kl_weight on SD's scale (1e-6). Writes the diffusers folder models/encoder/vae/.
- hybrid-vq: the quantiser's codebook + beta x commitment loss, the reconstruction decoded from
  the discrete latent through the straight-through estimator; the codebook's perplexity and
  dead codes are logged at every step. Writes models/encoder/tokenizer.pt.
Hyper-parameters come from encoder.pretrain.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from rae_core.config import Config, from_dict
from rae_core.data.folder import ImageSource
from rae_core.data.loader import step_loader
from rae_core.paths import Paths
from rae_core.plots import LossCurve, write_empty
from rae_core.store import write_json
from rae_core.train.common import (
    Checkpointer,
    MetricsLog,
    NonFiniteGuard,
    Objective,
    data_parallel,
    global_mean,
    grad_norm,
    local_batch,
    set_lr,
    warmup_cosine,
)
from rae_core.train.sampler import BatchDraws, per_sample, step_seed

log = logging.getLogger(__name__)


class KLRecipe:
    """An AutoencoderKL: L1 + kl_weight x the per-pixel KL of the sampled posterior."""

    def __init__(self, cfg: Config):
        from rae_core.vae import build_vae

        self.cfg, self.model = cfg, build_vae(cfg.encoder.name)

    def last_layer_weight(self) -> torch.Tensor:
        return self.model.decoder.conv_out.weight

    def reconstruct(self, model, x: torch.Tensor,
                    draws: BatchDraws) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """[0, 1] images -> (reconstruction in [0, 1]-space, regulariser, its metrics), by
        `model` (self.model); the posterior's sample draws its noise per sample from `draws`."""
        posterior = model.encode(x * 2 - 1).latent_dist
        eps = per_sample(draws, len(x), lambda m, g: torch.randn(m, *posterior.mean.shape[1:],
                                                                  generator=g))
        rec = model.decode(posterior.mean + posterior.std * eps.to(x.device)).sample * 0.5 + 0.5
        kl = posterior.kl().mean()  # nats per image, summed over the latent
        return rec, self.cfg.autoencoder.kl_weight * kl / x[0].numel(), {"kl": kl.item()}

    def parts(self):
        from rae_core.vae import vae_parts

        return vae_parts(self.cfg.encoder.name, self.model.eval(), self.cfg.data.resolution)

    def save(self, paths: Paths) -> None:
        from rae_core.vae import pretrained_dir, save_vae

        save_vae(self.model, pretrained_dir(paths))


class VQRecipe:
    """HART's tokenizer, phase 1 (VAR's training): the discrete latent's reconstruction and
    the quantiser's loss."""

    def __init__(self, cfg: Config):
        from rae_core.autoencoder import tokenizer_config
        from rae_core.hybrid_vq import HybridTokenizer

        self.cfg, self.model = cfg, HybridTokenizer(tokenizer_config(cfg))

    def last_layer_weight(self) -> torch.Tensor:
        return self.model.decoder.conv_out.weight

    def reconstruct(self, model, x: torch.Tensor,
                    draws: BatchDraws) -> tuple[torch.Tensor, torch.Tensor, dict]:
        out = model(x * 2 - 1, generator=draws)
        usage = {"vq_loss": out.vq_loss.item(), "perplexity": float(out.perplexity),
                 "dead_codes": out.dead_codes}
        return out.reconstruction * 0.5 + 0.5, out.vq_loss, usage

    def parts(self):
        from rae_core.hybrid_vq import TokenizerDecoder, TokenizerEncoder

        tok = self.model.eval()
        return TokenizerEncoder(self.cfg.encoder.name, tok).eval(), TokenizerDecoder(tok).eval()

    def save(self, paths: Paths) -> None:
        from rae_core.hybrid_vq import save_tokenizer

        save_tokenizer(self.model, self.cfg.encoder.name, paths.encoder_dir / "tokenizer.pt")


def train_loop(config: dict) -> dict:
    """One worker's loop. On W workers the autoencoder and the discriminator are each a DDP
    module; each rank trains on its 1/W of the same global batch with the posterior noise,
    hybrid choices, flips and augmentations one worker would draw for those samples
    (BatchDraws), and the adaptive GAN weight is measured on the global batch's gradients, so
    W workers reach one worker's weights up to float rounding; rank 0 checkpoints."""
    from rae_core.discriminator import build_discriminator
    from rae_core.images import grid, save_png
    from rae_core.losses import (
        LPIPSLoss,
        adaptive_gan_weight,
        diff_augment,
        generator_loss,
        hinge_d_loss,
    )
    from rae_core.train.decoder import evaluate_reconstruction, validation_images
    from rae_core.train.runner import worker_setup

    cfg, paths, run_dir = from_dict(config["cfg"]), Paths.at(config["root"]), Path(config["run_dir"])
    rank, world, device = worker_setup(cfg)
    p, d, g = cfg.encoder.pretrain, cfg.decoder, cfg.decoder.gan
    local_batch(p.batch_size, world, "encoder.pretrain.batch_size")
    torch.manual_seed(cfg.seed)
    root = paths.dataset(cfg.data.root)
    source = step_loader(ImageSource(root, "train", cfg.data.resolution, cfg.data.max_in_memory),
                         cfg, device, p.batch_size, p.steps, rank, world)
    val_images = validation_images(cfg, paths)
    recipe = VQRecipe(cfg) if cfg.autoencoder.kind == "hybrid-vq" else KLRecipe(cfg)
    model = recipe.model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.95),
                            weight_decay=p.weight_decay)
    lpips = LPIPSLoss(weights=d.lpips_weights).to(device) if d.lpips_weight > 0 else None
    # The GAN only where it would act within these steps (a dino disc needs weights to build).
    use_gan = g.weight > 0 and min(g.disc_start_step, g.gen_start_step) < p.steps
    states: dict = {"model": model, "opt": opt}
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
    curve = LossCurve(paths, "pretrain-encoder", run_dir, start, enabled=rank == 0)
    guard = NonFiniteGuard("pretrain-encoder", "encoder.pretrain", p.nonfinite_patience, ckpt,
                           states, metrics, curve, world=world)
    # the generator's loss uses the plain discriminator: the gradients it leaves there are
    # discarded, so nothing to average
    net = data_parallel(Objective(model, recipe.reconstruct), world, device)
    disc_net = data_parallel(disc, world, device) if use_gan else None
    average = (lambda grad: global_mean(grad, world)) if world > 1 else None
    zero = torch.zeros((), device=device)
    for step in guard.steps(start, p.steps):
        torch.manual_seed(step_seed(cfg.seed, step, rank))  # anything drawn without `draws`
        draws = BatchDraws(cfg.seed, step, rank, world)
        x, _ = source.get(step, draws)
        x = x.to(device)
        rec, reg, reg_metrics = net(x, draws)
        l1 = (rec - x).abs().mean()
        lp = lpips(rec, x).mean() if lpips is not None else zero
        rec_loss = l1 + d.lpips_weight * lp
        gan_loss, lam = zero, zero
        if use_gan and step >= g.gen_start_step:
            gan_loss = generator_loss(disc(diff_augment(rec, draws) if g.diffaug else rec))
            lam = adaptive_gan_weight(rec_loss, gan_loss, recipe.last_layer_weight(),
                                      average=average)
        loss = rec_loss + reg + g.weight * lam * gan_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the autoencoder's gradients
        # the discriminator's gradients too before any update: a step updates both or neither
        disc_step = use_gan and step >= g.disc_start_step
        d_loss, d_norm = zero, zero
        if disc_step:
            real, fake = x, rec.detach().clamp(0, 1).mul(255).round().div(255)  # as saved
            if g.diffaug:
                real, fake = diff_augment(real, draws), diff_augment(fake, draws)
            d_loss = hinge_d_loss(disc_net(real), disc_net(fake))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()  # and here the discriminator's
            d_norm = grad_norm(disc)
        if not guard.finite(loss, grad_norm(model), d_loss, d_norm):
            guard.skip(step)
            continue
        lr = guard.lr_scale * warmup_cosine(step, p.lr, p.lr * 0.1, p.warmup_steps, p.steps)
        set_lr(opt, lr)
        opt.step()
        if disc_step:
            set_lr(opt_d, guard.lr_scale * g.disc_lr)
            opt_d.step()
        done = step + 1
        if "perplexity" in reg_metrics:  # the codebook's usage, at every step
            metrics.metrics(done, perplexity=reg_metrics.pop("perplexity"),
                            dead_codes=reg_metrics.pop("dead_codes"))
        if done % 10 == 0 or done == p.steps:
            with torch.no_grad():
                mse = ((rec.detach().clamp(0, 1) - x) ** 2).flatten(1).mean(1)
                psnr = (-10 * torch.log10(mse.clamp_min(1e-10))).mean()
            extra = dict(lpips=lp.item()) if lpips is not None else {}
            if use_gan:
                extra.update(gan_loss=gan_loss.item(), gan_lambda=float(lam),
                             disc_loss=d_loss.item())
            metrics.metrics(done, l1=l1.item(), psnr=psnr.item(), lr=lr, **reg_metrics, **extra)
            curve.add(done, loss.item())
        if rank == 0 and (done % p.ckpt_every == 0 or done == p.steps):
            ckpt.save(done, **states)
            curve.write()
    curve.write()
    summary: dict = {"steps": p.steps, "resumed_at": start}
    if rank == 0:
        encoder, decoder = recipe.parts()
        vx = val_images.to(device)
        ev = evaluate_reconstruction(encoder, decoder, vx)
        metrics.metrics(p.steps, **ev)
        summary.update(ev)
        with torch.no_grad():
            shown = vx[torch.linspace(0, len(vx) - 1, 16).long()]  # across classes
            recs = decoder(encoder.encode(shown)).clamp(0, 1)
        metrics.artifact(p.steps, save_png(grid(torch.cat([shown, recs]), nrow=16),
                                           run_dir / "reconstructions.png", upscale=2))
        recipe.save(paths)
    return summary


def fingerprint(cfg: Config) -> str:
    """What the trained autoencoder depends on: its own sections and the losses it borrows from the
    decoder stage (LPIPS, GAN), not the rest of that stage (noise, steps)."""
    decoder = cfg.to_dict()["decoder"]
    losses = {k: decoder[k] for k in ("lpips_weight", "lpips_weights", "gan")}
    own = cfg.fingerprint("data", "encoder", "autoencoder", "seed")
    return hashlib.sha256(json.dumps([own, losses], sort_keys=True).encode()).hexdigest()[:12]


def run(cfg: Config, paths: Paths) -> dict:
    """Train the VAE or tokenizer that encoder.name registers, unless encoder.weights gives one;
    writes models/encoder/vae/ or tokenizer.pt, and models/encoder/summary.json."""
    from rae_core.train.runner import fit

    paths.encoder_dir.mkdir(parents=True, exist_ok=True)
    if cfg.encoder.weights is not None:
        info = {"skipped": True, "reason": f"{cfg.encoder.name} uses the given weights "
                f"{cfg.encoder.weights}"}
        write_json(paths.encoder_dir / "summary.json", info)
        write_empty(paths, "pretrain-encoder")
        return info
    fp = fingerprint(cfg)
    run_dir = paths.checkpoints / f"pretrain-encoder-{fp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = fit(f"pretrain-encoder-{fp}", train_loop,
                  {"cfg": cfg.to_dict(), "root": str(paths.root), "run_dir": str(run_dir),
                   "fingerprint": fp}, cfg, paths.ray_storage)
    write_json(paths.encoder_dir / "summary.json", summary)
    return summary

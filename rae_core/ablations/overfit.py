"""Ablation (a)'s experiment: fit a DiT to ONE training latent and measure how far the loss
falls. A DiT narrower than the latent's channels cannot (the paper's width rule)."""

from __future__ import annotations

import torch

from rae_core.config import Config
from rae_core.paths import Paths


def overfit_one_latent(cfg: Config, paths: Paths, steps: int, batch: int) -> dict:
    """Fit the configured DiT to ONE training latent (fresh noise and time for each of `batch`
    copies at every step) and measure how far the loss falls.

    The score is the loss after training on 1024 fixed (noise, time) draws; a model that has
    memorised the latent predicts every velocity exactly, so a wide one approaches zero.
    """
    from rae_core.autoencoder import load_encoder, load_stats, stats_identity
    from rae_core.data.latents import ShardSource
    from rae_core.generator import latent_shift
    from rae_core.models import build_model
    from rae_core.train.common import set_lr, warmup_constant_linear
    from rae_core.transport import Transport

    d = cfg.generator
    encoder = load_encoder(cfg, paths)
    stats = load_stats(cfg, paths, encoder)
    source = ShardSource(paths.latents_dir, stats, stats_identity(cfg, encoder), hflip=False)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = source.get(torch.tensor([0]), gen)
    shape = tuple(encoder.latent_shape)
    torch.manual_seed(cfg.seed)
    model = build_model(d.model, in_channels=shape[0], grid_size=shape[1],
                        num_classes=cfg.data.num_classes, label_dropout=0.0, allow_narrow=True,
                        **d.overrides())
    transport = Transport(time_dist=d.time_dist, shift=latent_shift(cfg, shape))
    opt = torch.optim.AdamW(model.parameters(), lr=d.lr, betas=tuple(d.betas), weight_decay=0.0)
    xb, yb = x.expand(batch, *shape), y.expand(batch)
    curve = []
    for step in range(steps):
        noise = torch.randn(xb.shape, generator=gen)
        t = transport.sample_time(batch, generator=gen)
        loss = transport.loss(model, xb, yb, noise=noise, t=t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), d.grad_clip or float("inf"))
        set_lr(opt, warmup_constant_linear(step, d.lr, d.min_lr, round(0.05 * steps),
                                           steps // 2, steps))
        opt.step()
        if (step + 1) % 10 == 0 or step + 1 == steps:
            curve.append((step + 1, loss.item()))
    model.eval()
    g = torch.Generator().manual_seed(10_000 + cfg.seed)  # the same draws for every width
    n = 1024
    with torch.no_grad():
        final = transport.loss(model, x.expand(n, *shape), y.expand(n),
                               noise=torch.randn((n, *shape), generator=g),
                               t=transport.sample_time(n, generator=g))
    return {"overfit_loss": float(final), "steps": steps, "curve": curve,
            "params": sum(p.numel() for p in model.parameters())}

"""The paper's ablations of its own recipe, on RAE latents of the configured encoder:

    a  width rule: a DiT narrower than the latent's channels cannot fit even one latent
    b  dimension-dependent time shift vs none
    c  noise-augmented decoder vs the plain one
    d  DiT-DH vs a plain DiT at equal training FLOPs, on the 64-channel latent and on a
       256-channel one (the paper's regime: a latent wide for the width the budget affords)
    e  the same DiT on RAE latents vs on pixels at equal training FLOPs

The reference arm (the configured DiT-DH, shift, noise-augmented decoder) is the baseline of
b, c and d; (f) trains the same generator with the same recipe at its own budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from rae_core.ablations.compute import (
    ema_for,
    matched_depth,
    matched_steps,
    schedule,
    train_flops,
)
from rae_core.ablations.plan import DATASET, AblationSet, Arm, Claim, Root, lane, sized
from rae_core.autoencoder import latent_shape
from rae_core.config import Config, from_dict


@dataclass(frozen=True)
class Size:
    """How big these ablations are for one preset."""

    dit_steps: int  # the DiT-DH reference arm; the other generators get equal FLOPs
    overfit_steps: int  # the widest single-sample overfit; narrower ones get equal FLOPs
    overfit_batch: int  # copies of the one latent per step, each with its own noise and time
    dit_model: str  # the plain DiT of (a), (d) and (e)
    dit_hidden: int  # its width in (d) and (e): >= the pixel latent's 3 x 8 x 8 = 192 channels
    widths: tuple[int, ...] = (32, 64, 96)  # (a): below, at and above the 64 latent channels


SIZES: dict[str, Size] = {
    # a few minutes on 2 CPU cores: the start-up of the Ray Train fits (~20 s each) dominates
    "smoke": Size(dit_steps=60, overfit_steps=100, overfit_batch=32, dit_model="DiT-micro",
                  dit_hidden=192),
    # per seed 3 decoders (600 steps), 4 generators (~500 steps at ~4 steps/s per lane),
    # 5 x 400 samples with CFG
    "tiny": Size(dit_steps=500, overfit_steps=400, overfit_batch=64, dit_model="DiT-tiny",
                 dit_hidden=192),
}

PIXELS = Root("shared-pixels", ("stats", "extract"), {"encoder.name": "pixels"}, DATASET)
# (d)'s wide latent: its own encoder, statistics, latents and one noise-augmented decoder
WIDE = Root("shared-wide", ("pretrain-encoder", "stats", "extract", "train-decoder"),
            {"encoder.name": "mae-tiny-256", "decoder.noise_tau": 0.8}, DATASET)


def recipe(cfg: Config) -> dict:
    """What every generator arm pins, whatever --set says: the time shift by the latent's
    dimension, the noise-augmented decoder, and its lane's share of the CPUs."""
    return {"generator.shift": None, "decoder.noise_tau": 0.8, **lane(cfg)}


def reference(cfg: Config) -> Arm:
    """The configured DiT-DH on RAE latents with the paper's recipe."""
    from rae_core.models import model_flops_per_image
    from rae_core.transport import shift_factor

    size = sized(SIZES, cfg.preset)
    c, grid, _ = latent_shape(cfg)
    dh = cfg.generator.model
    shift = shift_factor(grid * grid, c, cfg.generator.shift_base)
    return Arm("reference", f"{dh}, time shift s = {shift:.3g}, decoder noise tau 0.8, "
               "RAE latents", {**recipe(cfg), **schedule(cfg, size.dit_steps)},
               dh, model_flops_per_image(dh, c, grid, **cfg.generator.overrides()),
               size.dit_steps, cfg.generator.batch_size)


def _plain_dit(model: str, hidden: int, channels: int, grid: int, target_per_image: float
               ) -> tuple[dict, float, str]:
    """A plain DiT of this width whose depth makes its FLOPs per image closest to the target:
    its overrides, its FLOPs per image and a label."""
    from rae_core.models import model_flops_per_image

    depth = matched_depth(model, channels, grid, target_per_image, hidden=hidden)
    overrides = {"generator.model": model, "generator.hidden": hidden, "generator.depth": depth,
                 "generator.heads": None}
    return overrides, model_flops_per_image(model, channels, grid, hidden=hidden, depth=depth), \
        f"{model} (hidden {hidden}, depth {depth})"


def _wide_latent(cfg: Config, ref: Arm) -> list[Arm]:
    """(d) where the latent is wide for the budget: DiT-DH with the reference's narrow body and a
    head as wide as the latent vs a plain DiT that wide in every block, at the reference's
    training FLOPs."""
    from rae_core.models import model_flops_per_image

    size = sized(SIZES, cfg.preset)
    c, grid, _ = latent_shape(from_dict(WIDE.config(cfg.to_dict())))
    dh, batch = cfg.generator.model, cfg.generator.batch_size
    body = cfg.generator.overrides()
    dh_flops = model_flops_per_image(dh, c, grid, **body, head_hidden=c)
    dh_steps = matched_steps(ref.train_flops, dh_flops, batch)
    plain, dit_flops, label = _plain_dit(size.dit_model, c, c, grid, dh_flops)
    dit_steps = matched_steps(ref.train_flops, dit_flops, batch)
    return [
        Arm("wide-dh", f"{dh} with a {c}-wide head on the {c}-channel latent (mae-tiny-256), "
            "FLOPs of the reference", {**recipe(cfg), **schedule(cfg, dh_steps),
                                       **ema_for(cfg, dh_steps), "generator.head_hidden": c},
            dh, dh_flops, dh_steps, batch, root=WIDE),
        Arm("wide-dit", f"{label} on the {c}-channel latent, FLOPs of the reference",
            {**recipe(cfg), **plain, **schedule(cfg, dit_steps), **ema_for(cfg, dit_steps)},
            size.dit_model, dit_flops, dit_steps, batch, root=WIDE),
    ]


def design(cfg: Config) -> tuple[list[Arm], list[Claim]]:
    """Every arm of a-e, with matched compute, and the paper's claims on them."""
    from rae_core.models import model_flops_per_image

    size = sized(SIZES, cfg.preset)
    rae_c, grid, _ = latent_shape(cfg)
    pix_c = latent_shape(from_dict(PIXELS.config(cfg.to_dict())))[0]
    batch = cfg.generator.batch_size
    ref = reference(cfg)
    dh = ref.model

    plain, dit_flops, dit_label = _plain_dit(size.dit_model, size.dit_hidden, rae_c, grid,
                                             ref.flops_per_image)
    pix_flops = model_flops_per_image(size.dit_model, pix_c, grid, hidden=size.dit_hidden,
                                      depth=plain["generator.depth"])
    dit_steps = matched_steps(ref.train_flops, dit_flops, batch)
    pix_steps = matched_steps(ref.train_flops, pix_flops, batch)
    common = recipe(cfg)
    arms = [
        ref,
        Arm("no-shift", f"{dh} with shift s = 1 (none)",
            {**common, **schedule(cfg, ref.steps), "generator.shift": 1.0}, dh,
            ref.flops_per_image, ref.steps, batch, decoder_from="reference"),
        Arm("plain-decoder", "decoder without noise augmentation (tau 0), the reference arm's "
            "DiT", {**ref.overrides, "decoder.noise_tau": 0.0},
            dh, ref.flops_per_image, ref.steps, batch, generator_from="reference"),
        Arm("dit", f"{dit_label} on RAE latents, FLOPs of the reference",
            {**common, **plain, **schedule(cfg, dit_steps)}, size.dit_model, dit_flops,
            dit_steps, batch, decoder_from="reference"),
        # The pixel "decoder" only has to learn un-patchifying: no noise augmentation.
        Arm("pixels", f"{dit_label} on pixels ({pix_c} channels), FLOPs of the reference",
            {**common, **plain, **schedule(cfg, pix_steps), "decoder.noise_tau": 0.0},
            size.dit_model, pix_flops, pix_steps, batch, root=PIXELS),
        *_wide_latent(cfg, ref),
    ]
    ob = size.overfit_batch
    w_flops = {w: model_flops_per_image(size.dit_model, rae_c, grid, hidden=w)
               for w in size.widths}
    budget = train_flops(w_flops[max(size.widths)], ob, size.overfit_steps)
    for w in size.widths:
        rel = "<" if w < rae_c else ("=" if w == rae_c else ">")
        arms.append(Arm(f"width-{w}", f"{size.dit_model} hidden {w} {rel} {rae_c} latent "
                        "channels, fit to one latent",
                        {"generator.model": size.dit_model, "generator.hidden": w,
                         "generator.depth": None, "generator.heads": None,
                         "generator.shift": None}, size.dit_model, w_flops[w],
                        matched_steps(budget, w_flops[w], ob), ob, overfit=True))
    wide_c = latent_shape(from_dict(WIDE.config(cfg.to_dict())))[0]
    return arms, claims(size, rae_c, wide_c)


def claims(size: Size, channels: int, wide_channels: int) -> list[Claim]:
    narrow = [w for w in size.widths if w < channels]
    wide = [w for w in size.widths if w >= channels]
    out = [Claim("a", "overfit_loss", f"width-{w}", f"width-{n}",
                 f"hidden {n} < {channels} channels cannot fit one sample; {w} >= {channels} "
                 "can (paper: DiT-S, 384 < 768 channels, stays at high loss)")
           for n in narrow for w in wide]
    dh_paper = "DiT-DH converges faster and better: gFID 4.28 (DiT-XL) -> 2.16 (DiTDH-XL), " \
               "80 epochs, on 768 channels"
    for metric in ("fid", "class_accuracy"):
        implied = "" if metric == "fid" else " (implied by better samples)"
        out += [
            Claim("b", metric, "reference", "no-shift",
                  f"the shift (s = 6.93 at 256 px) improves samples: gFID 23.08 -> 4.81"
                  f"{implied}"),
            Claim("c", metric, "reference", "plain-decoder",
                  f"noise augmentation improves samples: gFID 4.81 -> 4.28{implied}"),
            Claim("d", metric, "reference", "dit", f"{dh_paper}{implied}",
                  case=f"{channels}-channel latent"),
            Claim("d", metric, "wide-dh", "wide-dit", f"{dh_paper}{implied}",
                  case=f"{wide_channels}-channel latent"),
            Claim("e", metric, "dit", "pixels",
                  f"diffusion in RAE latents beats diffusion in pixels{implied}"),
        ]
    out += [Claim("c", "rfid", "plain-decoder", "reference",
                  "noise augmentation costs reconstruction: rFID 0.49 -> 0.57"),
            Claim("c", "recon_psnr", "plain-decoder", "reference",
                  "noise augmentation costs reconstruction (implied by rFID)")]
    return sorted(out, key=lambda c: c.ablation)


ABLATIONS = AblationSet(
    titles={"a": "width rule (one-latent overfit)",
            "b": "dimension-dependent time shift",
            "c": "noise-augmented decoder",
            "d": "DiT-DH vs DiT, equal FLOPs",
            "e": "RAE latents vs pixels, equal FLOPs"},
    design=design)

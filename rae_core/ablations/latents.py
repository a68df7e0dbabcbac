"""(f) RAE latents vs VAE latents, the paper's central comparison, at small scale.

The reference's DiT-DH trained with the reference's recipe (flow matching, the time shift, a
noise-augmented decoder) on RAE latents, against the same architecture with the same objective
on the latents of a KL autoencoder (at patch 2: as many tokens), and against DiT's own recipe on
those latents (DiT/2, IDDPM diffusion, respaced DDPM sampling), each at the same training FLOPs.
The VAE and DiT's recipe are those of the family preset of the same size (smoke-vae, tiny-vae).
Each autoencoder is trained once, in its root (shared-rae: the shared encoder's latents and one
decoder; shared-vae: the slim VAE with its own decoder); the seeds vary the generators.

Each arm also scores its EMA checkpoints, so the report gives the training FLOPs each needs to
reach the VAE flow arm's final FID (the paper: 47x less training than SiT-XL on SD-VAE), and
the two autoencoders' rFID, PSNR and MACs side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

from rae_core.ablations import rae
from rae_core.ablations.compute import (
    ema_for,
    flops_to_reach,
    matched_steps,
    schedule,
    train_flops,
)
from rae_core.ablations.plan import (
    DATASET,
    SHARED,
    AblationSet,
    Arm,
    Claim,
    Plan,
    Root,
    sized,
)
from rae_core.ablations.report import mean_curve, number, summary
from rae_core.autoencoder import autoencoder_macs, latent_shape
from rae_core.config import Config, flatten, from_dict


@dataclass(frozen=True)
class Size:
    """How big (f) is for one preset: its own budget, below the reference's, so that three
    seeds of three arms fit in minutes."""

    steps: int  # of the RAE arm; the VAE arms get its training FLOPs
    num_per_class: int  # samples per class for the final FID and class accuracy
    checkpoints: int  # EMA checkpoints scored along training (the FID curve)
    curve_per_class: int  # samples per class for the FID of each checkpoint


SIZES: dict[str, Size] = {
    "smoke": Size(steps=40, num_per_class=8, checkpoints=3, curve_per_class=4),
    "tiny": Size(steps=200, num_per_class=20, checkpoints=4, curve_per_class=10),
}

VAE_PRESETS = {"smoke": "smoke-vae", "tiny": "tiny-vae"}
TOKEN_PATCH = 2  # 8x8x4 VAE latent at patch 2: 16 tokens, as many as the 4x4x64 RAE latent

# The RAE: the shared encoder's latents and one noise-augmented decoder for every seed
RAE_ROOT = Root("shared-rae", ("train-decoder",), {"decoder.noise_tau": 0.8}, SHARED)

# The paper's autoencoders at 256 px (dit-and-hart.md A, rae-method.md)
PAPER_RAE = "DINOv2-B + ViT-XL: rFID 0.49 (0.57 with noise augmentation), 22 / 106 GMAC"
PAPER_VAE = "SD-VAE: rFID 0.62, 135 / 310 GMAC"


def _vae_family(cfg: Config) -> Config:
    """The family preset of this size: its VAE and DiT's recipe."""
    from rae_core.presets import load_config

    return load_config(None, sized(VAE_PRESETS, cfg.preset))


def vae_root(cfg: Config) -> Root:
    """The slim VAE pretrained here, its latent scale, latents and own decoder."""
    family = _vae_family(cfg).to_dict()
    return Root("shared-vae", ("pretrain-encoder", "stats", "extract", "train-decoder"),
                flatten({k: family[k] for k in ("autoencoder", "encoder")}), DATASET)


def design(cfg: Config) -> tuple[list[Arm], list[Claim]]:
    from rae_core.models import model_flops_per_image

    size, family = sized(SIZES, cfg.preset), _vae_family(cfg)
    dh, batch = cfg.generator.model, cfg.generator.batch_size
    rae_c, rae_grid, _ = latent_shape(cfg)
    rae_flops = model_flops_per_image(dh, rae_c, rae_grid, **cfg.generator.overrides())
    budget = train_flops(rae_flops, batch, size.steps)
    root = vae_root(cfg)
    c, grid, _ = latent_shape(from_dict(root.config(cfg.to_dict())))
    flow_flops = model_flops_per_image(dh, c, grid, **cfg.generator.overrides(),
                                       patch=TOKEN_PATCH)
    flow_steps = matched_steps(budget, flow_flops, batch)
    g, s = family.generator, family.sample
    ddpm_flops = model_flops_per_image(g.model, c, grid)
    ddpm_steps = matched_steps(budget, ddpm_flops, batch)
    common = {**rae.recipe(cfg), "sample.num_per_class": size.num_per_class,
              "evaluate.curve_per_class": size.curve_per_class}
    latent = f"{c}x{grid}x{grid} {family.encoder.name} latents"

    def trained(steps: int) -> dict:
        """The shared settings, with the schedule and EMA of `steps` training steps."""
        return {**common, **schedule(cfg, steps, size.checkpoints), **ema_for(cfg, steps)}

    arms = [
        Arm("rae-flow", f"{dh} on {rae_c}x{rae_grid}x{rae_grid} {cfg.encoder.name} latents, the "
            "reference's recipe at (f)'s budget", trained(size.steps),
            dh, rae_flops, size.steps, batch, root=RAE_ROOT),
        Arm("vae-flow", f"{dh} at patch {TOKEN_PATCH} on {latent}, flow matching, FLOPs of "
            "rae-flow", {**trained(flow_steps), "generator.patch": TOKEN_PATCH},
            dh, flow_flops, flow_steps, batch, root=root),
        Arm("vae-ddpm", f"DiT's recipe on {latent}: {g.model}, DDPM, {s.sampler} "
            f"{s.steps} steps, CFG {s.scale:g}; FLOPs of rae-flow",
            {**trained(ddpm_steps), "generator.kind": g.kind, "generator.model": g.model,
             "sample.sampler": s.sampler, "sample.steps": s.steps, "sample.scale": s.scale},
            g.model, ddpm_flops, ddpm_steps, batch, root=root),
    ]
    return arms, claims()


def claims() -> list[Claim]:
    out = []
    for loser, case in (("vae-flow", "same DiT-DH and flow matching"),
                        ("vae-ddpm", "DiT's recipe: DiT/2 and DDPM")):
        out += [
            Claim("f", "fid", "rae-flow", loser, "RAE latents reach a lower FID at equal "
                  "training compute: DiTDH-XL 2.16 vs DiT-XL on SD-VAE 7.13 at 80 epochs; 47x "
                  "fewer epochs than SiT-XL to the same FID", case=case),
            Claim("f", "class_accuracy", "rae-flow", loser, "RAE latents train faster (implied "
                  "by better samples)", case=case),
        ]
    out.append(Claim("f", "rfid", "rae-flow", "vae-flow", "RAE reconstructs better than "
                     "SD-VAE: rFID 0.49 (0.57 noise-augmented) vs 0.62", case="the autoencoders"))
    return out


def tables(plan: Plan, results: dict, report: dict, parent: str) -> list[dict]:
    """The compute each arm needs to reach the VAE flow arm's final FID, and the autoencoders
    side by side."""
    target = report["curves"]["vae-flow"][-1]["mean"]
    reach = {a: flops_to_reach(mean_curve(report, a), target["value"])
             for a in ("rae-flow", "vae-flow", "vae-ddpm")}
    rows = []
    for arm, flops in reach.items():
        final = report["curves"][arm][-1]["mean"]
        if flops is None:
            rows.append([arm, plan.arm(arm).description, final, "not reached", "—"])
            continue
        ratio = None if reach["vae-flow"] is None else number(
            f"f.{arm}.compute_ratio", reach["vae-flow"] / flops, parent)
        rows.append([arm, plan.arm(arm).description, final,
                     number(f"f.{arm}.flops_to_target", flops, parent), ratio])
    compute = {
        "ablation": "f", "title": "training compute to reach the VAE flow arm's final FID",
        "columns": ["arm", "what", "final FID on the curve (mean)",
                    f"training FLOPs to FID {target['value']:.4g}",
                    "x less compute than vae-flow"],
        "rows": rows,
        "note": "On the mean FID curve over seeds (FID of "
                f"{plan.base['data']['num_classes']} x {SIZES[plan.preset].curve_per_class} "
                "samples at each EMA checkpoint, the same noise at every checkpoint), "
                "interpolated linearly between checkpoints; at the first checkpoint when already "
                "there. Paper (ImageNet 256): 47x fewer training epochs than SiT-XL on SD-VAE. "
                "The plot plots/f-curve.png shows the curves."}
    rows = []
    for arm, kind, paper in (("rae-flow", "RAE", PAPER_RAE), ("vae-flow", "VAE", PAPER_VAE)):
        cfg = from_dict(plan.arm(arm).config(plan.base, plan.seeds[0]))
        enc, dec = autoencoder_macs(cfg)
        c, h, w = latent_shape(cfg)
        decoder = cfg.decoder.model if kind == "RAE" else f"{cfg.encoder.name} decoder"
        rows.append([f"{kind}: {cfg.encoder.name} + {decoder}", f"{c}x{h}x{w}",
                     summary(plan, results, arm, "rfid", f"f.{arm}.rfid", parent),
                     summary(plan, results, arm, "recon_psnr", f"f.{arm}.recon_psnr", parent),
                     number(f"f.{kind.lower()}.encoder_gmac", enc / 1e9, parent),
                     number(f"f.{kind.lower()}.decoder_gmac", dec / 1e9, parent), paper])
    autoencoders = {
        "ablation": "f", "title": "the autoencoders side by side",
        "columns": ["autoencoder", "latent", "rFID ↓", "PSNR ↑",
                    f"encoder GMAC at {plan.base['data']['resolution']} px", "decoder GMAC",
                    "paper, 256 px"],
        "rows": rows}
    return [compute, autoencoders]


ABLATIONS = AblationSet(titles={"f": "RAE latents vs VAE latents, equal FLOPs"}, design=design,
                        tables=tables)

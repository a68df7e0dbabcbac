"""(g) HART at small scale: its hybrid tokens, its residual head, and its speed against RAE.

HART's tokenizer, transformer and sampler are those of the family preset of the same size
(smoke-hart, tiny-hart); the tokenizer is trained once, in its root (shared-hart), and the seeds
vary the generators. Three comparisons:

- the tokenizer's rFID and PSNR from its hybrid latent (discrete + residual) vs from its
  discrete tokens alone, one decoder for both (evaluate measures both);
- the same trained HART sampled with and without its residual head (`sample.residual`);
- HART against (f)'s RAE arm, the reference's DiT-DH on RAE latents, at the same training
  FLOPs: FID against the sample stage's images/s.
"""

from __future__ import annotations

from rae_core.ablations import latents
from rae_core.ablations.compute import ema_for, matched_steps, scalewise_flops_per_image, schedule
from rae_core.ablations.plan import DATASET, AblationSet, Arm, Claim, Plan, Root, lane, sized
from rae_core.ablations.report import number, summary
from rae_core.config import Config, flatten, from_dict

HART_PRESETS = {"smoke": "smoke-hart", "tiny": "tiny-hart"}
SAMPLER = ("sampler", "steps", "guidance", "scale", "top_k", "top_p", "residual")
RAE_ARM = "rae-flow"  # (f)'s DiT-DH on RAE latents: its budget is (g)'s

PAPER_SPEED = ("HART samples faster than diffusion at similar quality: HART-d20 FID 2.39 in "
               "1.5 s per batch of 64 vs DiT-XL/2 FID 2.27 in 113 s (A100, ImageNet 256); "
               "4.5-7.7x the throughput of diffusion models at 1024 px")


def _hart_family(cfg: Config) -> Config:
    """The family preset of this size: its tokenizer, transformer and sampler."""
    from rae_core.presets import load_config

    return load_config(None, sized(HART_PRESETS, cfg.preset))


def hart_root(cfg: Config) -> Root:
    """The family's tokenizer pretrained here, its residual statistics, latents and phase-2
    decoder. The root carries the family's generator and sampler too: a hybrid-vq
    configuration is only valid with generator.kind = hart."""
    family = _hart_family(cfg).to_dict()
    settings = flatten({k: family[k] for k in ("autoencoder", "encoder", "decoder",
                                                "generator")})
    settings.update({f"sample.{k}": family["sample"][k] for k in SAMPLER})
    return Root("shared-hart", ("pretrain-encoder", "stats", "extract", "train-decoder"),
                settings, DATASET)


def design(cfg: Config) -> tuple[list[Arm], list[Claim]]:
    size, family = sized(latents.SIZES, cfg.preset), _hart_family(cfg)
    rae_arm = next(a for a in latents.design(cfg)[0] if a.name == RAE_ARM)
    g = family.generator
    flops = scalewise_flops_per_image(family)
    steps = matched_steps(rae_arm.train_flops, flops, g.batch_size)
    trained = {**schedule(family, steps, size.checkpoints), **ema_for(family, steps),
               "sample.num_per_class": size.num_per_class,
               "evaluate.curve_per_class": size.curve_per_class, **lane(cfg)}
    head, root = f"{family.sample.steps}-step residual head", hart_root(cfg)
    arms = [
        rae_arm,
        Arm("hart", f"{g.model} on {family.encoder.name} tokens with its {head}, FLOPs of "
            f"{RAE_ARM}", {**trained, "sample.residual": True}, g.model, flops, steps,
            g.batch_size, root=root),
        # the same generator and noise: only the head is left out, and evaluate scores the
        # same tokenizer again, so this arm also gives the rFID of its tokens alone
        Arm("hart-tokens", f"hart's generator sampled without its {head} (discrete tokens "
            "alone)", {**trained, "sample.residual": False, "evaluate.curve_per_class": 0},
            g.model, flops, steps, g.batch_size, root=root, generator_from="hart"),
    ]
    return arms, claims()


def claims() -> list[Claim]:
    tokenizer, head = "tokenizer, hybrid latent vs tokens alone", "residual head, with vs without"
    return [
        Claim("g", "rfid", "hart", "hart-tokens", "the residual makes reconstructions better: "
              "rFID 0.92 (discrete) -> 0.41 (hybrid), ImageNet 256", case=tokenizer,
              loser_metric="rfid_discrete"),
        Claim("g", "recon_psnr", "hart", "hart-tokens", "the residual makes reconstructions "
              "better (implied by rFID)", case=tokenizer, loser_metric="recon_psnr_discrete"),
        Claim("g", "fid", "hart", "hart-tokens", "the residual head improves samples: FID "
              "2.67 -> 2.39 (HART-d20; d24 2.23 -> 2.00, d30 2.00 -> 1.77)", case=head),
        Claim("g", "class_accuracy", "hart", "hart-tokens", "the residual head improves samples "
              "(implied by FID)", case=head),
        Claim("g", "images_per_s", "hart", RAE_ARM, PAPER_SPEED,
              case=f"speed against {RAE_ARM}"),
    ]


def tables(plan: Plan, results: dict, report: dict, parent: str) -> list[dict]:
    """FID and class accuracy beside the sampling throughput of each arm, and HART's speed-up
    over the RAE arm."""
    rows, speed = [], {}
    for name in (RAE_ARM, "hart", "hart-tokens"):
        arm = plan.arm(name)
        cells = [summary(plan, results, name, m, f"g.{name}.{m}", parent)
                 for m in ("fid", "class_accuracy", "images_per_s")]
        speed[name] = cells[-1]["mean"]["value"]
        ratio = None if name == RAE_ARM else \
            number(f"g.{name}.speedup", speed[name] / speed[RAE_ARM], parent)
        rows.append([name, arm.description, arm.model, report["arms"][name]["train_flops"],
                     *cells, ratio])
    rae, hart = (from_dict(plan.arm(a).config(plan.base, plan.seeds[0])).sample
                 for a in (RAE_ARM, "hart"))
    return [{
        "ablation": "g", "title": "quality against sampling speed at equal training FLOPs",
        "columns": ["arm", "what", "model", "training FLOPs", "FID ↓", "class accuracy ↑",
                    "images/s ↑", f"x the images/s of {RAE_ARM}"],
        "rows": rows,
        "note": f"Paper: {PAPER_SPEED}. The quality half of that claim has no direction to test: "
                "FID and class accuracy are as measured. Images/s are the sample stage's "
                "(sampling and decoding, one worker, each arm with its own sampler: HART "
                f"scale by scale, CFG {hart.scale:g}, then {hart.steps} steps of its head; "
                f"{RAE_ARM} {rae.sampler} in {rae.steps} steps, CFG {rae.scale:g}), measured "
                "while another arm may run in the other lane: compare the arms of one run "
                "only. The tokenizer is trained once: its rFID and PSNR are the same on every "
                "seed."}]


ABLATIONS = AblationSet(titles={"g": "HART: hybrid vs discrete tokens; speed vs RAE at equal "
                                     "FLOPs"}, design=design, tables=tables)

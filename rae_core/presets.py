"""The registry of named presets: overrides on top of the schema defaults (the `tiny` preset).

ImageNet numbers follow the paper (rae-method.md); epochs are converted to optimiser steps with
1,281,167 training images.
"""

from __future__ import annotations

import difflib

from rae_core.config import merge
from rae_core.errors import ConfigError

IMAGENET_TRAIN = 1_281_167
# six of a Train worker's 8 CPUs decode JPEGs ahead of the step; its own process keeps two
IMAGENET_LOADER = {"workers": 6, "prefetch": 4}


def _epochs(epochs: float, batch: int) -> int:
    return round(epochs * IMAGENET_TRAIN / batch)


SMOKE = {
    "preset": "smoke",
    "encoder": {"name": "mae-micro",
                "pretrain": {"steps": 40, "batch_size": 64, "warmup_steps": 5, "ckpt_every": 20}},
    "stats": {"batch_size": 512},
    "extract": {"batch_size": 512, "shard_size": 400},
    "decoder": {"model": "ViT-micro", "steps": 40, "batch_size": 64, "warmup_steps": 5,
                "eval_every": 20, "ckpt_every": 20,
                "gan": {"disc_start_step": 20, "gen_start_step": 25}},
    "generator": {"model": "DiTDH-micro", "steps": 60, "batch_size": 64, "grad_accum": 2,
            "warmup_steps": 5, "decay_start_step": 30, "sample_every": 30, "ckpt_every": 20},
    "sample": {"num_per_class": 8, "steps": 10, "batch_size": 80, "shard_size": 40},
    "evaluate": {"classifier_epochs": 6},
}

# The schema defaults are the tiny preset, except the shift's base: the paper's 4096 gives
# s = sqrt(16 * 64 / 4096) = 0.5 on the 4x4x64 latent, i.e. no shift towards noise at all;
# base 256 gives s = 2, and at equal steps class accuracy rose with s (0.5 < 1 < 2).
TINY: dict = {"preset": "tiny", "generator": {"shift_base": 256.0}}

# The embedded default on crops of colour photographs (data.dataset=photos). Their detail needs
# more decoder steps (at 600 the decoder still paints flat 8x8 patches: 23.7 dB) and lighter
# noise augmentation (tau 0.3; 900 steps: 25.8 dB); the GAN stays, as without it the patch
# seams were twice as strong. Its linear head paints each 8x8 patch from one token, so the patch
# grid still showed (seam ratio 5.0 against the photos' 1.0 after 900 steps); a residual 5x5
# convolution across the patch edges removes it (0.92; 3x3: 1.81) at the same step time. The
# decoder runs beside the generator, which it must not outlast: the generator's registered model
# carries the decoder.
TINY_PHOTOS: dict = merge(TINY, {
    "preset": "tiny-photos",
    "data": {"dataset": "photos"},
    "decoder": {"noise_tau": 0.3, "steps": 900, "eval_every": 450, "ckpt_every": 300,
                "refine": {"channels": 32, "kernel": 5}},
})


def _imagenet(resolution: int, dit_epochs: int, ag_scale: float, ag_epochs: int) -> dict:
    dec_batch, dit_batch = 512, 1024
    return {
        "preset": f"imagenet{resolution}",
        "data": {"dataset": "folder", "source": "data/imagenet", "root": "data/imagenet",
                 "resolution": resolution, "num_classes": 1000, "hflip": True,
                 "loader": IMAGENET_LOADER},
        "encoder": {"name": "dinov2-b"},
        "stats": {"batch_size": 256, "shards": 8},
        "extract": {"enabled": False, "dtype": "bfloat16", "shard_size": 8192},
        "decoder": {"model": "ViT-XL", "patch_size": 16, "noise_tau": 0.8, "noise_law": "paper",
                    "steps": _epochs(16, dec_batch), "batch_size": dec_batch, "lr": 2e-4,
                    "min_lr": 2e-5, "warmup_steps": _epochs(1, dec_batch), "ema": 0.9978,
                    "lpips_weight": 1.0,
                    "gan": {"disc": "dino", "weight": 0.75,
                            "disc_start_step": _epochs(6, dec_batch),
                            "gen_start_step": _epochs(8, dec_batch)},
                    "eval_every": 5000, "ckpt_every": 2500},
        "generator": {"model": "DiTDH-XL", "steps": _epochs(dit_epochs, dit_batch),
                "batch_size": dit_batch, "lr": 2e-4, "min_lr": 2e-5, "warmup_steps": 0,
                "decay_start_step": _epochs(40, dit_batch), "ema": 0.9995, "grad_clip": 1.0,
                "time_dist": "logit_normal", "shift_base": 4096.0, "precision": "bf16",
                "compile": True, "latents": "online", "sample_every": 25000,
                # 20 of the ~200 EMA snapshots (3.4 GB each), spread over the run
                "ckpt_every": 5000, "keep_snapshots": 20},
        "sample": {"num_per_class": 50, "sampler": "euler", "steps": 50,
                   "guidance": "autoguidance", "scale": ag_scale,
                   "weak_model": f"models/autoguidance/DiTDH-S-{resolution}px-ep{ag_epochs}.pt",
                   "batch_size": 125, "shard_size": 1000},
        "evaluate": {"extractor": "inception", "curve_per_class": 0},
        "ray": {"num_workers": 8, "use_gpu": True, "cpus_per_worker": 8,
                # GPU nodes scale from zero: a p5-class node takes ~10-20 min to boot and set up
                "scale_up_timeout_s": 2400},
    }


# DiT's recipe on a VAE latent space (dit-and-hart.md, A and B). The embedded default's data
# and compute: a slim AutoencoderKL pretrained here (8x8x4 latent at 32 px), DiT/2 with IDDPM
# diffusion (16 tokens, like RAE's 4x4x64 latent), respaced DDPM sampling with CFG.
def _vae_family(base: dict, vae: str, pretrain: dict, model: str, sample: dict) -> dict:
    return merge(base, {
        "autoencoder": {"kind": "vae"},
        "encoder": {"name": vae, "pretrain": pretrain},
        "generator": {"kind": "ddpm", "model": model},
        "sample": {"sampler": "ddpm", **sample},
    })


SMOKE_VAE = _vae_family({**SMOKE, "preset": "smoke-vae"}, "vae-micro",
                        {"steps": 40, "batch_size": 32, "lr": 3e-3, "warmup_steps": 3,
                         "weight_decay": 0.0, "ckpt_every": 10},
                        "DiT-micro/2", {"steps": 10})
TINY_VAE = merge(_vae_family({**TINY, "preset": "tiny-vae"}, "vae-tiny",
                             # 31.5 dB validation PSNR on the digits in ~100 s on one thread
                             {"steps": 100, "batch_size": 64, "lr": 2e-3, "warmup_steps": 10,
                              "weight_decay": 0.0, "ckpt_every": 50},
                             "DiT-tiny/2", {"steps": 100, "scale": 4.0}),
                 # DiT's DDPM objective learns slower than flow matching: 800 steps (FID 2.74)
                 {"generator": {"steps": 800, "decay_start_step": 400, "sample_every": 400}})


def _imagenet_dit() -> dict:
    """DiT-XL/2 on SD-VAE at 256 px with the DiT paper's settings. The SD-VAE weights are a local
    diffusers folder (sd-vae-ft-ema); the platform's choices where the paper is silent or where it
    departs on purpose are marked."""
    batch = 256
    return {
        "preset": "imagenet256-dit",
        "data": {"dataset": "folder", "source": "data/imagenet", "root": "data/imagenet",
                 "resolution": 256, "num_classes": 1000, "hflip": True,
                 "loader": IMAGENET_LOADER},
        "autoencoder": {"kind": "vae", "scale": 0.18215, "finetune_decoder": False},
        "encoder": {"name": "sd-vae", "weights": "models/sd-vae-ft-ema"},
        "stats": {"batch_size": 256, "shards": 8},
        # choice: latents extracted once (posterior mean, both flips) instead of encoding in
        # the training loop as DiT's train.py does
        "extract": {"enabled": True, "dtype": "bfloat16", "shard_size": 8192},
        "generator": {"kind": "ddpm", "model": "DiT-XL/2", "steps": 400_000, "batch_size": batch,
                      "lr": 1e-4, "min_lr": 1e-4, "warmup_steps": 0, "decay_start_step": 400_000,
                      "betas": [0.9, 0.999], "weight_decay": 0.0, "ema": 0.9999,
                      "grad_clip": 0.0, "label_dropout": 0.1,
                      "precision": "fp32",  # DiT trained in fp32 (TF32 matmuls)
                      "compile": True, "latents": "shards", "sample_every": 50_000,
                      "ckpt_every": 50_000},
        # FID-50K with CFG 1.5 and 250 DDPM steps; CFG on all four channels (the reference's
        # 3-of-4 variant: sample.cfg_channels=first3)
        "sample": {"num_per_class": 50, "sampler": "ddpm", "steps": 250, "guidance": "cfg",
                   "scale": 1.5, "cfg_channels": "all", "batch_size": 125, "shard_size": 1000},
        "evaluate": {"extractor": "inception", "curve_per_class": 0},
        "ray": {"num_workers": 8, "use_gpu": True, "cpus_per_worker": 8,
                # GPU nodes scale from zero: a p5-class node takes ~10-20 min to boot and set up
                "scale_up_timeout_s": 2400},
    }


# HART (dit-and-hart.md, C and D) on the embedded default's data: a multi-scale VQ tokenizer
# pretrained here (phase 1), its decoder retrained on discrete or hybrid latents (phase 2),
# HART = a VAR over the 30 tokens of 4 scales + a residual diffusion head sampled in 8 steps.
def _hart_family(base: dict, tokenizer: str, pretrain: dict, decoder: dict, model: str,
                 generator: dict, sample: dict) -> dict:
    return merge(base, {
        "autoencoder": {"kind": "hybrid-vq", "hybrid_prob": 0.5},
        "encoder": {"name": tokenizer, "pretrain": pretrain},
        "decoder": decoder,
        "generator": {"kind": "hart", "model": model, **generator},
        "sample": {"sampler": "scalewise", "steps": 8, **sample},
    })


SMOKE_HART = _hart_family(
    {**SMOKE, "preset": "smoke-hart"}, "vq-micro",
    # 120 steps: the codes start near zero, and at 40 steps the tokens still decode to the
    # mean digit (12.2 dB against 16.4 dB at 120 steps)
    {"steps": 120, "batch_size": 32, "lr": 3e-3, "warmup_steps": 3, "weight_decay": 0.0,
     "ckpt_every": 40},
    {"lr": 1e-3}, "HART-micro", {"lr": 1e-3}, {"scale": 1.0})
TINY_HART = merge(_hart_family(
    {**TINY, "preset": "tiny-hart"}, "vq-tiny",
    {"steps": 200, "batch_size": 64, "lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.0,
     "ckpt_every": 100},
    # phase 2 at the tokenizer's lr; the GAN (whose schedule the pretraining shares) joins
    # only after the 200 steps of phase 1
    {"steps": 300, "lr": 1.5e-3, "min_lr": 1e-4, "warmup_steps": 10, "eval_every": 300,
     "ckpt_every": 150, "gan": {"disc_start_step": 200, "gen_start_step": 225}},
    "HART-tiny", {"steps": 1000, "batch_size": 64, "lr": 1e-3, "min_lr": 1e-4,
                  "decay_start_step": 500, "sample_every": 500, "ckpt_every": 250},
    {"scale": 1.0}),
    # the convolutional tokenizer and the transformer are compute-bound: both cores per worker
    {"ray": {"cpus_per_worker": 2}})


def _imagenet_hart() -> dict:
    """HART-d20 at 256 px: VAR's tokenizer (var-vq, 680 tokens in 10 scales) as a local
    checkpoint, its decoder retrained on hybrid latents (HART's phase 2), the transformer and
    head trained on ImageNet, FID-50K with VAR's sampling settings. Values marked `choice` are
    not given by the VAR or HART papers (nor by the notes this platform follows)."""
    batch = 768  # choice: VAR's batch for d16-d20 as we read its code; HART gives none
    return {
        "preset": "imagenet256-hart",
        "data": {"dataset": "folder", "source": "data/imagenet", "root": "data/imagenet",
                 "resolution": 256, "num_classes": 1000, "hflip": True,
                 "loader": IMAGENET_LOADER},
        "autoencoder": {"kind": "hybrid-vq", "hybrid_prob": 0.5},  # HART: about half each
        # VAR's tokenizer weights in this module's layout (choice: HART fine-tunes VAR's)
        "encoder": {"name": "var-vq", "weights": "models/var-vq-256.pt"},
        "stats": {"batch_size": 256, "shards": 8},
        # the tokens are computed from f in fp32, as VAR encodes in its training loop (f in
        # fp32 of both flips would take 168 GB)
        "extract": {"enabled": False, "dtype": "float32", "shard_size": 8192},
        # HART's phase 2: only the decoder trains; steps, lr and the GAN schedule are choices
        # (HART reports 24K steps of its second decoder's ablation)
        "decoder": {"steps": 24_000, "batch_size": 256, "lr": 1e-4, "min_lr": 1e-5,
                    "warmup_steps": 1000, "ema": 0.999, "lpips_weight": 1.0,
                    "gan": {"disc": "dino", "weight": 0.75, "disc_start_step": 0,
                            "gen_start_step": 2000},
                    "eval_every": 2000, "ckpt_every": 2000},
        "generator": {"kind": "hart", "model": "HART-d20",
                      # choice: VAR-d20's 250 epochs, AdamW (0.9, 0.95), wd 0.05, lr 8e-5 x
                      # batch / 256, label dropout 0.1 (VAR's recipe as we read it)
                      "steps": _epochs(250, batch), "batch_size": batch, "lr": 8e-5 * batch / 256,
                      "min_lr": 8e-6, "warmup_steps": _epochs(3, batch),
                      "decay_start_step": _epochs(3, batch), "betas": [0.9, 0.95],
                      "weight_decay": 0.05, "ema": 0.9999, "grad_clip": 2.0,
                      "label_dropout": 0.1, "precision": "bf16", "compile": True,
                      # choice: the two losses added as per-token means (HART does not say)
                      "residual_weight": 1.0, "residual_scale": None, "mask_ratio": [0.5, 1.0],
                      "latents": "online", "sample_every": 25_000, "ckpt_every": 5000},
        # VAR / HART FID settings: CFG 1.5 ramped over the scales, top-k 900, top-p 0.96; the
        # head's 8 steps
        "sample": {"num_per_class": 50, "sampler": "scalewise", "steps": 8, "guidance": "cfg",
                   "scale": 1.5, "top_k": 900, "top_p": 0.96, "residual": True,
                   "batch_size": 125, "shard_size": 1000},
        "evaluate": {"extractor": "inception", "curve_per_class": 0},
        "ray": {"num_workers": 8, "use_gpu": True, "cpus_per_worker": 8,
                "scale_up_timeout_s": 2400},
    }


# Every stage at 256 px with the paper's architectures on a small folder, end to end on one GPU
# in minutes: DINOv2-B's shape (16x16x768 latents) with untrained weights (nothing is
# downloaded), the ViT-XL decoder with patch 16, DiTDH-XL, and AutoGuidance by a DiTDH-S that
# train-generator trains after it on the same latents. 500 photo crops upscaled to 256 px, a few
# hundred steps, 1,000 samples: its figures say how fast each stage runs, not how good it is.
REHEARSAL: dict = {
    "preset": "rehearsal",
    "data": {"dataset": "photos", "resolution": 256, "per_class": 50, "hflip": True},
    "encoder": {"name": "dinov2-b", "random_init": True},
    "stats": {"batch_size": 128, "shards": 1},
    "extract": {"batch_size": 128, "shard_size": 256, "dtype": "bfloat16", "precision": "bf16"},
    "decoder": {"model": "ViT-XL", "patch_size": 16, "noise_tau": 0.8, "steps": 150,
                "batch_size": 32, "lr": 2e-4, "min_lr": 2e-5, "warmup_steps": 15, "ema": 0.99,
                "gan": {"disc_start_step": 75, "gen_start_step": 100},
                "eval_every": 150, "ckpt_every": 75},
    "generator": {"model": "DiTDH-XL", "steps": 300, "batch_size": 64, "lr": 2e-4, "min_lr": 2e-5,
                  "warmup_steps": 0, "decay_start_step": 150, "ema": 0.99, "grad_clip": 1.0,
                  "shift_base": 4096.0, "precision": "bf16", "compile": True,
                  "sample_every": 300, "ckpt_every": 150,
                  "weak": {"model": "DiTDH-S", "steps": 150}},
    "sample": {"num_per_class": 100, "sampler": "euler", "steps": 50, "guidance": "autoguidance",
               "scale": 1.42, "weak_model": "models/generator/weak/ema.pt", "batch_size": 125,
               "shard_size": 250, "precision": "bf16"},
    "evaluate": {"classifier_epochs": 8, "curve_per_class": 0, "precision": "bf16"},
    "ray": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 8},
}


PRESETS: dict[str, dict] = {
    "smoke": SMOKE,
    "tiny": TINY,
    "tiny-photos": TINY_PHOTOS,
    "imagenet256": _imagenet(256, 800, 1.42, 14),
    "imagenet512": _imagenet(512, 400, 1.5, 20),
    "smoke-vae": SMOKE_VAE,
    "tiny-vae": TINY_VAE,
    "imagenet256-dit": _imagenet_dit(),
    "smoke-hart": SMOKE_HART,
    "tiny-hart": TINY_HART,
    "imagenet256-hart": _imagenet_hart(),
    "rehearsal": REHEARSAL,
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"--preset {name}: unknown preset{hint} "
                          f"(valid presets: {', '.join(PRESETS)})")
    return PRESETS[name]


def load_config(params_path: str | None = None, preset_name: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()):
    """The active configuration: a preset (when named) or params.yaml, plus `--set` overrides."""
    import os

    import yaml

    from rae_core.config import apply_overrides, from_dict

    if preset_name is not None:
        data = merge({}, preset(preset_name))
    elif params_path is not None and os.path.exists(params_path):
        with open(params_path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" line {mark.line + 1}" if mark else ""
                raise ConfigError(f"{params_path}:{where} is not valid YAML") from None
    else:
        data = merge({}, TINY)
    return from_dict(apply_overrides(data, list(overrides)))


def preset_yaml(name: str) -> str:
    """The full configuration of a preset as the text of a params.yaml."""
    import yaml

    from rae_core.config import from_dict

    header = (f"# Active configuration, tracked by DVC. Written by `rae params --preset {name}`;\n"
              "# every key is validated by rae_core/config.py.\n")
    return header + yaml.safe_dump(from_dict(preset(name)).to_dict(), sort_keys=False)

"""The autoencoder as the stages use it, resolved from `autoencoder.kind` in this one place.

- `rae`: a frozen representation encoder (MAE pretrained here, DINOv2, SigLIP2, ...), exact
  per-element latent statistics, and the ViT decoder trained by `train-decoder`.
- `vae`: a diffusers AutoencoderKL (SD-VAE from local files, or a slim one pretrained here):
  its posterior mean as the latent, one latent scale, and its own decoder (optionally
  fine-tuned by `train-decoder`).
- `hybrid-vq`: HART's tokenizer (rae_core.hybrid_vq), pretrained here by VAR's VQ objective
  unless weights are given: its continuous latent f unnormalised (the generator tokenises it
  itself), the statistics of the residual f - f_hat that HART's diffusion head learns, and its
  decoder, trained by `train-decoder` on the discrete or the hybrid latent at random.
Every stage reaches the encoder, the statistics and the decoder through these functions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rae_core.config import Config
from rae_core.errors import DataError
from rae_core.paths import Paths

SELF_PRETRAINED = ("mae-tiny", "mae-micro", "mae-tiny-256")


def tokenizer_config(cfg: Config):
    """The hybrid-vq tokenizer's config: the registered one with autoencoder's overrides, at
    the dataset's resolution."""
    from rae_core.hybrid_vq import tokenizer_config as registered

    a = cfg.autoencoder
    return registered(cfg.encoder.name, vocab=a.vocab, z_channels=a.channels, scales=a.scales,
                      resolution=cfg.data.resolution)


def latent_shape(cfg: Config) -> tuple[int, int, int]:
    """(C, H, W) of the configured autoencoder's latent, from its config (no weights read)."""
    if cfg.autoencoder.kind == "hybrid-vq":
        tok = tokenizer_config(cfg)
        side = tok.resolution // tok.downsampling
        return tok.z_channels, side, side
    if cfg.autoencoder.kind == "vae":
        from rae_core.vae import downsampling, vae_config

        vae = vae_config(cfg.encoder.name)
        f = downsampling(vae)
        return vae["latent_channels"], cfg.data.resolution // f, cfg.data.resolution // f
    from rae_core.encoders import ENCODERS, build_encoder

    # ViT-B weights are not allocated on the meta device, but its first use costs ~1.3 s: the
    # platform's own small encoders are built in milliseconds on the CPU instead
    spec = ENCODERS.get(cfg.encoder.name)
    with torch.device("meta" if spec is not None and spec.kind == "timm" else "cpu"):
        enc = build_encoder(cfg.encoder.name, cfg.data.resolution, random_init=True,
                            **cfg.encoder.overrides())
    return tuple(enc.latent_shape)


def needs_pretraining(cfg: Config) -> bool:
    """Autoencoders the platform pretrains itself when no weights are given."""
    if cfg.autoencoder.kind in ("vae", "hybrid-vq"):
        return cfg.encoder.weights is None
    return cfg.encoder.name in SELF_PRETRAINED and cfg.encoder.weights is None


def encoder_weights(cfg: Config, paths: Paths) -> str | None:
    if needs_pretraining(cfg):
        name = "tokenizer.pt" if cfg.autoencoder.kind == "hybrid-vq" else "encoder.pt"
        return str(paths.encoder_dir / name)
    return cfg.encoder.weights


def tokenizer_parts(cfg: Config, paths: Paths):
    """(encoder, decoder) of the hybrid-vq tokenizer pretrain-encoder wrote, or of the given
    weights."""
    from rae_core.hybrid_vq import tokenizer_parts as parts

    weights = encoder_weights(cfg, paths)
    if needs_pretraining(cfg) and not Path(weights).exists():
        raise DataError(f"{weights}: pretrained {cfg.encoder.name} tokenizer not found; run "
                        "`rae stage pretrain-encoder` first or set encoder.weights")
    return parts(cfg.encoder.name, tokenizer_config(cfg), weights, cfg.autoencoder.hybrid_prob)


def load_encoder(cfg: Config, paths: Paths, device: torch.device | str = "cpu") -> nn.Module:
    if cfg.autoencoder.kind == "hybrid-vq":
        return tokenizer_parts(cfg, paths)[0].to(device).eval()
    if cfg.autoencoder.kind == "vae":
        from rae_core.vae import load_configured_parts

        return load_configured_parts(cfg, paths)[0].to(device).eval()
    from rae_core.encoders import build_encoder

    weights = encoder_weights(cfg, paths)
    if needs_pretraining(cfg) and not Path(weights).exists():
        raise DataError(f"{weights}: pretrained {cfg.encoder.name} encoder not found; run "
                        "`rae stage pretrain-encoder` first or set encoder.weights")
    enc = build_encoder(cfg.encoder.name, cfg.data.resolution, weights=weights,
                        random_init=cfg.encoder.random_init, **cfg.encoder.overrides())
    return enc.to(device).eval()


def load_stats(cfg: Config, paths: Paths, encoder: nn.Module):
    """The latent normalisation: per-element statistics (rae), one scale (vae), none
    (hybrid-vq: its quantiser reads the latent as it is)."""
    from rae_core.encoders import LatentScale, LatentStats

    if cfg.autoencoder.kind == "hybrid-vq":
        return LatentScale(1.0)
    if cfg.autoencoder.kind == "vae" and cfg.autoencoder.scale is not None:
        return LatentScale(cfg.autoencoder.scale)
    stats = LatentStats.load(paths.stats_file, expected_identity=stats_identity(cfg, encoder))
    if cfg.autoencoder.kind == "vae":
        return LatentScale(1.0 / stats.global_std())
    return stats


def residual_scale(cfg: Config, paths: Paths, encoder: nn.Module) -> float:
    """What HART's residual head divides its target by: generator.residual_scale, or 3 x the
    RMS of the residual f - f_hat over the training images (the `stats` of hybrid-vq), so that
    almost all of it lies in [-1, 1]."""
    from rae_core.encoders import LatentStats

    if cfg.generator.residual_scale is not None:
        return cfg.generator.residual_scale
    stats = LatentStats.load(paths.stats_file, expected_identity=stats_identity(cfg, encoder))
    return 3.0 * float((stats.var + stats.mean ** 2).mean().sqrt())


def stats_identity(cfg: Config, encoder: nn.Module) -> dict:
    """What the statistics depend on: the encoder (and its weights) and the training images."""
    ident = dict(encoder.identity())
    ident.update(dataset=cfg.data.dataset, source=cfg.data.source or cfg.data.root,
                 resolution=cfg.data.resolution, hflip=cfg.data.hflip)
    return ident


def build_decoder_for(cfg: Config, paths: Paths, encoder: nn.Module) -> nn.Module:
    """The decoder `train-decoder` trains: a fresh ViT decoder (rae), or the VAE's own decoder
    with its pretrained weights (vae: the fine-tune starts from them; hybrid-vq: HART's phase 2
    starts from them)."""
    if cfg.autoencoder.kind == "hybrid-vq":
        return tokenizer_parts(cfg, paths)[1]
    if cfg.autoencoder.kind == "vae":
        from rae_core.vae import load_configured_parts

        return load_configured_parts(cfg, paths)[1]
    from rae_core.decoder import build_decoder

    c, h, _ = encoder.latent_shape
    return build_decoder(cfg.decoder.model, latent_channels=c, grid_size=h,
                         patch_size=cfg.decoder.patch_size, pixel_mean=encoder.pixel_mean,
                         pixel_std=encoder.pixel_std, noise_tau=cfg.decoder.noise_tau,
                         noise_law=cfg.decoder.noise_law,
                         refine_channels=cfg.decoder.refine.channels,
                         refine_kernel=cfg.decoder.refine.kernel, **cfg.decoder.overrides())


def load_decoder(cfg: Config, paths: Paths, encoder: nn.Module,
                 device: torch.device | str = "cpu") -> nn.Module:
    from rae_core.store import safe_load

    dec = build_decoder_for(cfg, paths, encoder)
    if cfg.decoder.weights:  # a released reference decoder instead of train-decoder's
        from rae_core.released import load_decoder as load_released

        return load_released(dec, cfg.decoder.weights).to(device).eval()
    state = safe_load(paths.decoder_dir / "decoder.pt")
    dec.load_state_dict(state["model"])
    return dec.to(device).eval()


def autoencoder_macs(cfg: Config) -> tuple[float, float]:
    """Multiply-accumulates of encoding and of decoding one image at the dataset's resolution,
    counted by torch's FLOP counter on the meta device (as rae_core.vae counts a VAE's)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rae_core.decoder import build_decoder
    from rae_core.encoders import build_encoder

    r = cfg.data.resolution
    if cfg.autoencoder.kind == "hybrid-vq":
        from rae_core.hybrid_vq import config_macs

        return config_macs(tokenizer_config(cfg))
    if cfg.autoencoder.kind == "vae":
        from rae_core.vae import vae_macs

        return vae_macs(cfg.encoder.name, r)
    with torch.device("meta"):
        encoder = build_encoder(cfg.encoder.name, r, random_init=True, **cfg.encoder.overrides())
        c, h, _ = encoder.latent_shape
        refine = cfg.decoder.refine
        decoder = build_decoder(cfg.decoder.model, c, h, cfg.decoder.patch_size,
                                encoder.pixel_mean, encoder.pixel_std,
                                refine_channels=refine.channels,
                                refine_kernel=refine.kernel, **cfg.decoder.overrides()).eval()
        macs = []
        for fn, x in ((encoder.encode, torch.empty(1, 3, r, r)),
                      (decoder, torch.empty(1, c, h, h))):
            with FlopCounterMode(display=False) as counter:
                fn(x)
            macs.append(counter.get_total_flops() / 2)
    return macs[0], macs[1]

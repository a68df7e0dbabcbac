"""The representation autoencoder as the stages use it: a frozen encoder, its latent statistics
and a decoder, all resolved from the configuration in this one place."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rae_core.config import Config
from rae_core.errors import DataError
from rae_core.paths import Paths

SELF_PRETRAINED = ("mae-tiny", "mae-micro")


def needs_pretraining(cfg: Config) -> bool:
    """Encoders the platform pretrains itself when no weights file is given."""
    return cfg.encoder.name in SELF_PRETRAINED and cfg.encoder.weights is None


def encoder_weights(cfg: Config, paths: Paths) -> str | None:
    if needs_pretraining(cfg):
        return str(paths.encoder_dir / "encoder.pt")
    return cfg.encoder.weights


def load_encoder(cfg: Config, paths: Paths, device: torch.device | str = "cpu") -> nn.Module:
    from rae_core.encoders import build_encoder

    weights = encoder_weights(cfg, paths)
    if needs_pretraining(cfg) and not Path(weights).exists():
        raise DataError(f"{weights}: pretrained {cfg.encoder.name} encoder not found; run "
                        "`rae stage pretrain-encoder` first or set encoder.weights")
    enc = build_encoder(cfg.encoder.name, cfg.data.resolution, weights=weights)
    return enc.to(device).eval()


def load_stats(cfg: Config, paths: Paths, encoder: nn.Module):
    from rae_core.encoders import LatentStats

    return LatentStats.load(paths.stats_file, expected_identity=stats_identity(cfg, encoder))


def stats_identity(cfg: Config, encoder: nn.Module) -> dict:
    """What the statistics depend on: the encoder (and its weights) and the training images."""
    ident = dict(encoder.identity())
    ident.update(dataset=cfg.data.dataset, source=cfg.data.source or cfg.data.root,
                 resolution=cfg.data.resolution, hflip=cfg.data.hflip)
    return ident


def build_decoder_for(cfg: Config, encoder: nn.Module) -> nn.Module:
    from rae_core.decoder import build_decoder

    c, h, _ = encoder.latent_shape
    return build_decoder(cfg.decoder.model, latent_channels=c, grid_size=h,
                         patch_size=cfg.decoder.patch_size, pixel_mean=encoder.pixel_mean,
                         pixel_std=encoder.pixel_std, noise_tau=cfg.decoder.noise_tau,
                         noise_law=cfg.decoder.noise_law)


def load_decoder(cfg: Config, paths: Paths, encoder: nn.Module,
                 device: torch.device | str = "cpu") -> nn.Module:
    from rae_core.train.common import safe_load

    dec = build_decoder_for(cfg, encoder)
    state = safe_load(paths.decoder_dir / "decoder.pt")
    dec.load_state_dict(state["model"])
    return dec.to(device).eval()

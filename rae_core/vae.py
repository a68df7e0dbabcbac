"""The VAE autoencoder family: diffusers' AutoencoderKL (DiT's SD-VAE) as an encoder/decoder pair.

Each architecture is a named AutoencoderKL config (`encoder.name` when autoencoder.kind = vae).
Its encoder maps [-1, 1] pixels through DownEncoderBlock2D stages (x2 down between stages, f =
2^(stages-1)) and a 1x1 quant conv to the mean and log-variance of a (C, R/f, R/f) latent; its
decoder inverts that through a 1x1 post-quant conv and UpDecoderBlock2D stages. The encoder and
decoder halves used by the stages come from ONE AutoencoderKL, loaded only from local files: a
diffusers folder (config.json + weights), or a single checkpoint in the original SD or the
diffusers layout beside a local config folder (autoencoder.config).

diffusers is imported inside functions: it costs seconds and the CLI imports this module.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rae_core.config import Config
from rae_core.encoders import Encoder, file_fingerprint
from rae_core.errors import ConfigError, DataError, WeightsMissingError
from rae_core.paths import Paths

log = logging.getLogger(__name__)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# The keys that fix the architecture (and hence the weights' shapes); the rest is metadata.
ARCH_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types",
             "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
             "norm_num_groups", "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv")


def _kl_config(channels: tuple[int, ...], layers: int, groups: int, sample_size: int,
               **extra: Any) -> dict[str, Any]:
    stages = len(channels)
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * stages,
                up_block_types=["UpDecoderBlock2D"] * stages, block_out_channels=list(channels),
                layers_per_block=layers, act_fn="silu", latent_channels=4,
                norm_num_groups=groups, sample_size=sample_size, **extra)


VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # stabilityai/sd-vae-ft-ema: x8 down, 83.7M parameters
    "sd-vae": _kl_config((128, 256, 512, 512), 2, 32, 256, scaling_factor=0.18215),
    # x4 down: 32 px digits -> 8 x 8 x 4 latents; ~0.68M parameters, trained by pretrain-encoder
    "vae-tiny": _kl_config((16, 32, 64), 1, 8, 32),
    # seconds-long smoke runs, same latent shape
    "vae-micro": _kl_config((8, 16, 16), 1, 8, 32),
}


def vae_config(name: str) -> dict[str, Any]:
    """The registered AutoencoderKL config `name`; an unknown name suggests the closest one."""
    if name not in VAE_CONFIGS:
        close = difflib.get_close_matches(name, VAE_CONFIGS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"encoder.name = {name!r} is not a registered VAE{hint}; valid with "
                          f"autoencoder.kind=vae: {', '.join(VAE_CONFIGS)}")
    return dict(VAE_CONFIGS[name])


def downsampling(config: Mapping[str, Any]) -> int:
    """The spatial factor f: every stage but the last halves the resolution."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def build_vae(name: str) -> nn.Module:
    """A randomly initialised AutoencoderKL of a registered config (under the current device)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(vae_config(name))


def vae_param_counts(name: str) -> tuple[int, int, int]:
    """(encoder, decoder, total) parameters on the meta device. The encoder includes the 1x1
    quant conv, the decoder the post-quant conv, so encoder + decoder = total."""
    with torch.device("meta"):
        vae = build_vae(name)
    enc = _count(vae.encoder) + _count(vae.quant_conv)
    dec = _count(vae.decoder) + _count(vae.post_quant_conv)
    return enc, dec, _count(vae)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def vae_macs(name: str, resolution: int) -> tuple[int, int]:
    """(encoder, decoder) multiply-accumulates per image at `resolution` px, counted by torch's
    FlopCounterMode on the meta device: convolutions, matmuls and the mid-block attention
    (FLOPs / 2); norms, activations, resampling and additions are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    config = vae_config(name)
    f, c = downsampling(config), config["latent_channels"]
    with torch.device("meta"):
        vae = build_vae(name)
        with FlopCounterMode(display=False) as enc:
            vae.quant_conv(vae.encoder(torch.empty(1, 3, resolution, resolution)))
        with FlopCounterMode(display=False) as dec:
            vae.decoder(vae.post_quant_conv(torch.empty(1, c, resolution // f, resolution // f)))
    return enc.get_total_flops() // 2, dec.get_total_flops() // 2


def write_vae_config(name: str, folder: str | Path) -> Path:
    """A registered config as a diffusers config folder (config.json), e.g. the
    autoencoder.config that a single checkpoint file needs."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        AutoencoderKL.from_config(vae_config(name)).save_config(folder)
    return Path(folder)


def save_vae(model: nn.Module, folder: str | Path) -> None:
    """save_pretrained into a temporary sibling, then swap it in: readers find the old folder,
    the new one or (for the instant between two renames) none, never a half-written one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        os.replace(folder, old)  # a directory cannot be renamed over a non-empty one
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ARCH_KEYS of a config, with AutoencoderKL's defaults where it omits them."""
    from diffusers import AutoencoderKL

    params = inspect.signature(AutoencoderKL.__init__).parameters
    arch = {k: config.get(k, params[k].default) for k in ARCH_KEYS}
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in arch.items()}


def _check_architecture(config: Mapping[str, Any], name: str, setting: str, where: Path) -> None:
    """Refuse weights whose architecture is not the registered `name` one, naming the nearest."""
    found, expected = _architecture(config), _architecture(vae_config(name))
    diffs = [f"{k} {found[k]} where {name} has {expected[k]}" for k in ARCH_KEYS
             if found[k] != expected[k]]
    if diffs:
        same = [n for n in VAE_CONFIGS if _architecture(VAE_CONFIGS[n]) == found]
        fix = (f"it is {same[0]!r}: set encoder.name={same[0]}" if same else
               f"give {name} weights or register this architecture in rae_core.vae.VAE_CONFIGS")
        raise ConfigError(f"{setting}: {where} is not a {name} AutoencoderKL "
                          f"({'; '.join(diffs)}); {fix}")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)  # original SD/LDM checkpoints nest it
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise DataError(f"encoder.weights: {path} cannot be read as a checkpoint "
                        f"({type(e).__name__}); give a .safetensors or torch state dict") from None
    if not isinstance(state, dict):
        raise DataError(f"encoder.weights: {path} holds a {type(state).__name__}, not a state dict")
    return state


def _load_single_file(path: Path, config_dir: str | None, name: str) -> nn.Module:
    """A checkpoint file in the original SD layout (encoder.down.0.block..., optionally under
    first_stage_model.) or diffusers' own, loaded strictly into a model built from config_dir.
    (from_single_file would fill missing keys with random weights without a word.)"""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if config_dir is None:
        raise ConfigError(f"autoencoder.config: null is not valid with the single checkpoint file "
                          f"encoder.weights={path}; give a local diffusers config folder "
                          f"(rae_core.vae.write_vae_config('{name}', DIR) writes one)")
    cdir = Path(config_dir).expanduser()
    if not (cdir / "config.json").is_file():
        raise ConfigError(f"autoencoder.config: {cdir} has no config.json; give a local "
                          "diffusers config folder of an AutoencoderKL")
    config = AutoencoderKL.load_config(cdir, local_files_only=True)
    _check_architecture(config, name, "autoencoder.config", cdir)
    state = _read_state_dict(path)
    if not any("down_blocks." in k for k in state):
        try:
            state = convert_ldm_vae_checkpoint(state, config)
        except Exception as e:  # noqa: BLE001 - a foreign layout fails anywhere in the mapping
            raise DataError(f"encoder.weights: {path} is neither an SD nor a diffusers "
                            f"AutoencoderKL checkpoint ({type(e).__name__})") from None
    model = AutoencoderKL.from_config(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                 if keys]
        raise DataError(f"encoder.weights: {path} does not fit the {name} architecture of "
                        f"autoencoder.config ({'; '.join(parts)}); give {name} weights")
    model.load_state_dict(state)
    return model


def _load_folder(folder: Path, name: str) -> nn.Module:
    from diffusers import AutoencoderKL

    if not (folder / "config.json").is_file():
        raise DataError(f"encoder.weights: {folder} has no config.json; give a diffusers "
                        "AutoencoderKL folder (save_pretrained) or a single checkpoint file")
    _check_architecture(AutoencoderKL.load_config(folder, local_files_only=True), name,
                        "encoder.weights", folder)
    try:
        model, info = AutoencoderKL.from_pretrained(folder, local_files_only=True,
                                                    low_cpu_mem_usage=False,
                                                    output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"encoder.weights: {folder} cannot be loaded ({first})") from None
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad:  # from_pretrained would otherwise keep random weights for missing keys
        raise DataError(f"encoder.weights: {folder} does not fit the {name} architecture "
                        f"({'; '.join(f'{k} {v[:3]}' for k, v in bad.items())})")
    return model


def weights_file(weights: str | Path) -> Path:
    """The file that identifies `weights`: itself, or a diffusers folder's weights file."""
    path = Path(weights)
    if path.is_dir():
        found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not found:
            raise DataError(f"encoder.weights: {path} holds none of {', '.join(WEIGHT_FILES)}")
        return found[0]
    return path


def load_vae(name: str, weights: str | Path, config_dir: str | None = None) -> nn.Module:
    """An AutoencoderKL of the registered architecture `name` from local files only, in eval
    mode: `weights` is a diffusers folder or a single checkpoint file (then `config_dir`, the
    autoencoder.config folder, gives its config). Nothing is fetched from the hub."""
    vae_config(name)  # an unknown name fails before any file is read
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network, even by accident
    path = Path(weights).expanduser()
    if path.is_dir():
        model = _load_folder(path, name)
    elif path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise DataError(f"encoder.weights: {path} is not a checkpoint; valid: a diffusers "
                            f"folder or a {'/'.join(SINGLE_FILE_SUFFIXES)} file")
        model = _load_single_file(path, config_dir, name)
    else:
        raise WeightsMissingError(f"encoder.weights: {path} not found; give a local diffusers "
                                  "folder or checkpoint file of the VAE")
    log.info("loaded VAE %s from %s", name, path)
    return model.eval()


class VAEEncoder(Encoder):
    """The encoder half: [0, 1] images -> the posterior MEAN (B, C, R/f, R/f), unscaled.

    The mean, not a sample: latents are stored once per image (and flip), so a sampled latent
    would freeze one draw of noise into the data set; any scaling is the stats stage's.
    """

    def __init__(self, name: str, resolution: int, vae: nn.Module, weights_label: str,
                 weights_sha256: str | None) -> None:
        f, c = downsampling(vae.config), vae.config.latent_channels
        if resolution % f:
            raise ConfigError(f"data.resolution = {resolution}; VAE {name} downsamples by {f}, "
                              f"so it needs a multiple of {f}")
        # The VAE sees [-1, 1]: mean and std 0.5.
        super().__init__(name, resolution, resolution, (c, resolution // f, resolution // f),
                         (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv  # AutoencoderKL's key names
        self.weights_label, self.weights_sha256 = weights_label, weights_sha256

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        moments = self.quant_conv(self.encoder(self.prepare(images)))  # (B, 2C, h, w)
        return moments[:, : self.latent_shape[0]]  # the mean; the rest is the log-variance


class VAEDecoder(nn.Module):
    """The decoder half: unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [0, 1]-space
    (not clamped, so training sees the true error). Trainable by the train-decoder loop: SD's
    decoder-only fine-tune."""

    def __init__(self, vae: nn.Module, latent_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    @property
    def last_layer_weight(self) -> Tensor:
        """The output conv's weight: where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        if z.shape[1:] != self.latent_shape:
            raise ValueError(f"decoder expects latents of shape {self.latent_shape}, "
                             f"got {tuple(z.shape[1:])}")
        return self.decoder(self.post_quant_conv(z)) * 0.5 + 0.5


def vae_parts(name: str, vae: nn.Module, resolution: int, weights_label: str = "random",
              weights_sha256: str | None = None) -> tuple[VAEEncoder, VAEDecoder]:
    """Both halves of one AutoencoderKL (they share its modules): the encoder frozen, the
    decoder trainable; both in eval mode."""
    encoder = VAEEncoder(name, resolution, vae, weights_label, weights_sha256)
    decoder = VAEDecoder(vae, encoder.latent_shape)
    return encoder.requires_grad_(False).eval(), decoder.eval()


def load_vae_parts(name: str, weights: str | Path, config_dir: str | None,
                   resolution: int) -> tuple[VAEEncoder, VAEDecoder]:
    """(encoder, decoder) of the VAE loaded by `load_vae`; the encoder's identity carries the
    weights' name and fingerprint."""
    vae = load_vae(name, weights, config_dir)
    path = Path(weights).expanduser()
    return vae_parts(name, vae, resolution, path.name, file_fingerprint(weights_file(path)))


def pretrained_dir(paths: Paths) -> Path:
    """Where pretrain-encoder writes the VAE it trains (a diffusers folder)."""
    return paths.encoder_dir / "vae"


def load_configured_parts(cfg: Config, paths: Paths) -> tuple[VAEEncoder, VAEDecoder]:
    """The VAE that cfg names: encoder.weights (with autoencoder.config for a single file), else
    the folder pretrain-encoder wrote."""
    weights = cfg.encoder.weights
    if weights is None:
        weights = pretrained_dir(paths)
        if not (weights / "config.json").is_file():
            raise DataError(f"{weights}: pretrained {cfg.encoder.name} VAE not found; run `rae "
                            "stage pretrain-encoder` first or set encoder.weights")
    return load_vae_parts(cfg.encoder.name, weights, cfg.autoencoder.config,
                          cfg.data.resolution)

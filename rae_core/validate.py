"""Checks of the names in a configuration against the registries, at config time."""

from __future__ import annotations

import difflib

from rae_core.config import Config
from rae_core.errors import ConfigError


def _known(key: str, value: str, names: list[str]) -> None:
    if value not in names:
        close = difflib.get_close_matches(value, names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{key}: {value!r} is not registered{hint} "
                          f"(valid: {', '.join(names)})")


GENERATOR_FAMILIES = {"flow": ("dit", "ditdh"), "ddpm": ("dit_ddpm",)}


def check_registries(cfg: Config) -> None:
    """Autoencoder, decoder and generator names exist and fit their kinds, and the generator is
    at least as wide as its tokens."""
    from rae_core.autoencoder import latent_shape
    from rae_core.decoder import DECODERS
    from rae_core.encoders import ENCODERS
    from rae_core.models import MODELS, check_width, get_config

    if cfg.autoencoder.kind == "hybrid-vq":
        import torch

        from rae_core.autoencoder import tokenizer_config
        from rae_core.hybrid_vq import TOKENIZERS, HybridTokenizer

        _known("encoder.name", cfg.encoder.name, list(TOKENIZERS))
        try:
            with torch.device("meta"):
                HybridTokenizer(tokenizer_config(cfg))  # scales that fit the latent
        except ValueError as e:
            raise ConfigError(f"autoencoder.scales: {e}") from None
    elif cfg.autoencoder.kind == "vae":
        from rae_core.vae import VAE_CONFIGS

        _known("encoder.name", cfg.encoder.name, list(VAE_CONFIGS))
    else:
        _known("encoder.name", cfg.encoder.name, list(ENCODERS))
        _known("decoder.model", cfg.decoder.model, list(DECODERS))
    g = cfg.generator
    if g.kind == "hart":
        from rae_core.models.registry import AR_MODELS

        _known("generator.model", g.model, list(AR_MODELS))
        return
    _known("generator.model", g.model, list(MODELS))
    families = GENERATOR_FAMILIES[g.kind]
    if get_config(g.model).family not in families:
        fits = [n for n in MODELS if MODELS[n].family in families]
        raise ConfigError(f"generator.model: {g.model!r} is not a model of generator.kind="
                          f"{g.kind} (valid: {', '.join(fits)})")
    try:
        check_width(g.model, latent_shape(cfg)[0], **g.overrides())
    except ValueError as e:
        raise ConfigError(f"generator.model: {e}") from None


def model_table() -> str:
    """Every registered generator, decoder, VAE and tokenizer with its parameter count and MACs
    (meta device), each sized on the latent or images it is registered for."""
    from rae_core.decoder import DECODERS, decoder_param_count
    from rae_core.hybrid_vq import TOKENIZERS, tokenizer_config, tokenizer_macs
    from rae_core.hybrid_vq import tokenizer_param_counts as tokenizer_params
    from rae_core.models import MODELS, count_params, model_macs, reference_latent
    from rae_core.models.registry import AR_MODELS, count_ar_params, reference_tokenizer
    from rae_core.vae import VAE_CONFIGS, vae_macs, vae_param_counts

    lines = [f"{'model':<14}{'params':>10}{'GMAC':>10}  sized on", "-" * 56]
    for name in MODELS:
        c, g, k = reference_latent(name)
        lines.append(f"{name:<14}{count_params(name, c, g, k) / 1e6:>9.1f}M"
                     f"{model_macs(name, c, g) / 1e9:>10.3g}  latent {c}x{g}x{g}, {k} classes")
    for name in AR_MODELS:
        vocab, channels, scales, k = reference_tokenizer(name)
        lines.append(f"{name:<14}{count_ar_params(name) / 1e6:>9.1f}M{'':>10}  tokens "
                     f"{vocab}x{channels}, scales {scales[0]}..{scales[-1]}, {k} classes")
    for name in DECODERS:
        small = "tiny" in name or "micro" in name
        c, g, p = (64, 4, 8) if small else (768, 16, 16)
        lines.append(f"{name:<14}{decoder_param_count(name, c, g, p) / 1e6:>9.1f}M"
                     f"{'':>10}  decoder {c}x{g}x{g} -> {g * p} px")
    for name in VAE_CONFIGS:
        res = 256 if name == "sd-vae" else 32
        enc, dec, total = vae_param_counts(name)
        enc_macs, dec_macs = vae_macs(name, res)
        lines.append(f"{name:<14}{total / 1e6:>9.1f}M{(enc_macs + dec_macs) / 1e9:>10.3g}  "
                     f"AutoencoderKL at {res} px: encoder {enc / 1e6:.1f}M / "
                     f"{enc_macs / 1e9:.4g} GMAC, decoder {dec / 1e6:.1f}M / "
                     f"{dec_macs / 1e9:.4g} GMAC")
    for name in TOKENIZERS:
        res = tokenizer_config(name).resolution
        enc, _, dec, total = tokenizer_params(name)
        enc_macs, dec_macs = tokenizer_macs(name)
        lines.append(f"{name:<14}{total / 1e6:>9.1f}M{(enc_macs + dec_macs) / 1e9:>10.3g}  "
                     f"multi-scale VQ at {res} px: encoder {enc / 1e6:.1f}M / "
                     f"{enc_macs / 1e9:.4g} GMAC, decoder {dec / 1e6:.1f}M / "
                     f"{dec_macs / 1e9:.4g} GMAC")
    return "\n".join(lines)


# Beyond this many images a folder's files are opened by prepare alone (ImageNet: minutes).
PREFLIGHT_MAX_FILES = 20_000


def preflight(cfg: Config, root, stages: list[str]) -> None:
    """The data and weight files that `stages` will read, checked in the driver before any
    server or worker starts, so that their errors come in seconds: the image folder (layout,
    class count, and every file of a small one) and each configured local weights file."""
    from pathlib import Path

    from rae_core.errors import WeightsMissingError
    from rae_core.paths import Paths

    paths = Paths.at(root)
    if "prepare" in stages and cfg.data.dataset == "folder":
        from rae_core.data.folder import validate_folder

        folder = paths.dataset(cfg.data.source or cfg.data.root)
        layout = validate_folder(folder, cfg.data.num_classes, check_files=False)
        if layout["train"] + layout["val"] <= PREFLIGHT_MAX_FILES:
            validate_folder(folder, cfg.data.num_classes, resolution=0)
    readers = {"encoder.weights": [s for s in stages if s != "prepare"],
               "decoder.gan.disc_weights": ["train-decoder"],
               "decoder.lpips_weights": ["train-decoder"],
               "evaluate.inception_weights": ["evaluate"],
               "decoder.weights": ["sample", "evaluate"], "generator.weights": ["sample"]}
    flat = cfg.flat()
    for key, users in readers.items():
        value = flat.get(key)
        if value and set(users) & set(stages) and not Path(value).expanduser().exists():
            raise WeightsMissingError(f"{key}: {value} not found; set it to an existing local "
                                      "file")
    if "evaluate" in stages and cfg.evaluate.extractor == "inception":
        from rae_core.metrics.features import resolve_inception_weights

        resolve_inception_weights(cfg.evaluate.inception_weights)
    if "evaluate" in stages and cfg.evaluate.reference:
        from rae_core.metrics.adm import layout as adm_layout

        adm_layout(cfg.evaluate.reference)  # its keys, before any image is sampled

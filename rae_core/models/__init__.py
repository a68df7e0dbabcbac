"""Stage-2 generators: flow-matching DiT and DiT-DH, the original DiT (DDPM), and their registry."""

from rae_core.models.dit import DiT
from rae_core.models.dit_ddpm import DiTDDPM
from rae_core.models.ditdh import DiTDH
from rae_core.models.registry import (
    MODELS,
    ModelConfig,
    ModelConfigError,
    build_model,
    check_width,
    count_params,
    get_config,
    model_flops_per_image,
    model_macs,
    reference_latent,
)

__all__ = [
    "MODELS",
    "DiT",
    "DiTDDPM",
    "DiTDH",
    "ModelConfig",
    "ModelConfigError",
    "build_model",
    "check_width",
    "count_params",
    "get_config",
    "model_flops_per_image",
    "model_macs",
    "reference_latent",
]

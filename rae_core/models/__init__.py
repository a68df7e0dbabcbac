"""Stage-2 generators: DiT and DiT-DH on RAE latents, and their registry."""

from rae_core.models.dit import DiT
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
)

__all__ = [
    "MODELS",
    "DiT",
    "DiTDH",
    "ModelConfig",
    "ModelConfigError",
    "build_model",
    "check_width",
    "count_params",
    "get_config",
    "model_flops_per_image",
]

"""Reconstruction quality of the autoencoder: PSNR, L1 and rFID on the validation split."""

from __future__ import annotations

import numpy as np
import torch

from rae_core.metrics.features import FeatureExtractor, as_float_images
from rae_core.metrics.fid import fid_from_features

MAX_PSNR = 100.0  # identical images: capped instead of inf, so means stay finite


def _pair(a: torch.Tensor | np.ndarray,
          b: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_float_images(a).double().cpu(), as_float_images(b).double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"image sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Mean over images of the per-image PSNR in dB, data range 1 (images in [0, 1])."""
    a, b = _pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    per_image = (-10.0 * torch.log10(mse)).clamp(max=MAX_PSNR)
    return float(per_image.mean())


def l1(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Mean absolute difference over all pixels."""
    a, b = _pair(a, b)
    return float((a - b).abs().mean())


def rfid(real: torch.Tensor | np.ndarray, reconstructed: torch.Tensor | np.ndarray,
         extractor: FeatureExtractor) -> float:
    """FID between real images and their reconstructions, in the extractor's feature space.

    Features of the whole sets are pooled before the Gaussian fit, so the value does not depend
    on any batch size (unlike the reference code's per-process rFID).
    """
    if len(real) != len(reconstructed):
        raise ValueError(f"{len(real)} real images but {len(reconstructed)} reconstructions")
    return fid_from_features(extractor(real), extractor(reconstructed))

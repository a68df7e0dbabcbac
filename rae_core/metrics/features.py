"""Feature extractors for FID, precision/recall and IS.

Every extractor has a `name`; FID statistics carry it so that numbers from different feature
spaces are never compared. Extraction is batched internally and each image is processed on its
own path (eval mode, no cross-sample state), so results do not depend on the batch size: the
reference code's rFID changed with the per-process batch size, this one must not.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from rae_core.errors import WeightsMissingError

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
# clean-fid downloads to (and reads from) this fixed path; where the file exists it never
# downloads, so a copy placed there by hand is accepted as well.
CLEANFID_CACHE = Path("/tmp") / INCEPTION_FILE
INCEPTION_SIZE = 299


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray: ...


def as_float_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) arrays or float (N, 3, H, W) in [0, 1] -> float32 (N, 3, H, W) tensor."""
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
        images = torch.from_numpy(images)
    return images.detach().float()


def batched(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
            batch_size: int) -> np.ndarray:
    """fn over consecutive batches of images, concatenated as float64 numpy."""
    out = [fn(images[i: i + batch_size]).double().cpu().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0))


def resolve_inception_weights(weights_path: str | os.PathLike | None) -> Path:
    """The Inception file to load: the configured one, else clean-fid's cache, else an error.

    Nothing is ever downloaded: a missing file is reported at once.
    """
    if weights_path:
        path = Path(weights_path).expanduser()
        if path.is_file():
            return path
        raise WeightsMissingError(
            f"Inception weights {path} not found: set evaluate.inception_weights to a local copy "
            f"of {INCEPTION_FILE} (clean-fid's TorchScript Inception)")
    if CLEANFID_CACHE.is_file():
        return CLEANFID_CACHE
    raise WeightsMissingError(
        f"Inception weights {INCEPTION_FILE} not found: set evaluate.inception_weights to a local "
        f"copy or place it at {CLEANFID_CACHE}")


class InceptionExtractor:
    """clean-fid's Inception-v3 ("clean" mode): 2048-d pool features and 1008-way logits.

    Images are quantised to 8 bit first (what clean-fid reads from saved PNGs), then resized to
    299 px with clean-fid's own PIL bicubic float resizer, so values match clean-fid's.
    """

    name = "inception-2015-12-05:clean"

    def __init__(self, weights_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 64):
        path = resolve_inception_weights(weights_path)
        from cleanfid.resize import build_resizer

        self.device = torch.device(device)  # the caller's (rae_core.device), never a guess
        self.batch_size = batch_size
        # Loading the TorchScript file directly (not through clean-fid's InceptionV3W, whose
        # constructor downloads when the file is absent) keeps this offline. The network exists
        # only as TorchScript, so torch's deprecation notice for jit.load is not actionable.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        self._resize = build_resizer("clean")
        log.info("Inception weights loaded from %s", path)

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        u8 = images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        x = np.stack([self._resize(img) for img in u8])  # (B, 299, 299, 3) float32 in [0, 255]
        return torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device)

    @torch.no_grad()
    def _pool(self, images: torch.Tensor) -> torch.Tensor:
        x = (self._resized(images) - 128.0) / 128.0  # clean-fid's normalisation
        return self.model.layers(x).reshape(len(images), 2048)

    @torch.no_grad()
    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        # No output bias, as the original IS implementation (and StyleGAN's port) computes it.
        return F.linear(self._pool(images), self.model.output.weight)

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        return batched(self._pool, as_float_images(images), self.batch_size)

    def logits(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, 1008) class logits for the Inception Score."""
        return batched(self._logits, as_float_images(images), self.batch_size)


class DomainExtractor:
    """Penultimate features of a domain classifier (see domain.py), named by its weights' hash,
    computed on `device` (default: where the classifier is), which it is moved to."""

    def __init__(self, classifier: torch.nn.Module, batch_size: int = 256,
                 device: str | torch.device | None = None):
        from rae_core.metrics.domain import classifier_id

        self.name = f"domain:{classifier_id(classifier)}"  # of the weights where they are read
        self.classifier = classifier.eval().to(device) if device is not None else classifier.eval()
        self.batch_size = batch_size
        self._device = next(self.classifier.parameters()).device

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.to(self._device))

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        return batched(self._features, as_float_images(images), self.batch_size)

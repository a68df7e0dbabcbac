"""A small CNN classifier of the dataset's own domain (default: 32x32 digits).

Inception features say little about 32 px digits, so the default FID and precision/recall use
this classifier's penultimate (globally pooled) features instead, and its predictions give the
class accuracy of conditional samples. It is trained on the training split only, in about a
minute of CPU, deterministically under a seed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from rae_core.device import torch_threads
from rae_core.errors import WeightsMissingError
from rae_core.metrics.features import as_float_images, batched

log = logging.getLogger(__name__)

SHIFT = 2  # augmentation: random translations of up to this many pixels


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class DomainClassifier(nn.Module):
    """A stride-2 stem, three conv blocks (two 2x poolings), global average pooling, linear head.

    The stem halves the resolution at once (most of the CPU cost sits at full resolution and the
    default digits carry 8x8 detail); global pooling makes the features resolution-agnostic and,
    like Inception's pool3, dense.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            _block(w, 2 * w), nn.MaxPool2d(2),
            _block(2 * w, 4 * w), nn.MaxPool2d(2),
            _block(4 * w, feature_dim), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)
        self.metadata: dict[str, Any] = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, feature_dim) penultimate features."""
        return self.body(x * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def classifier_id(model: nn.Module) -> str:
    """Short hash of the weights and buffers: features of different classifiers never mix."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _labels(labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)


def _translate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift every image by its own random offset in [-SHIFT, SHIFT]^2 (edges replicated)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (SHIFT,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, n), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(n)])


@torch.no_grad()
def predict(classifier: nn.Module, images: torch.Tensor | np.ndarray,
            batch_size: int = 256) -> np.ndarray:
    """Predicted class per image."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    logits = batched(lambda b: classifier(b.to(device)), as_float_images(images), batch_size)
    classifier.train(was_training)
    return logits.argmax(axis=1)


def class_accuracy(classifier: nn.Module, images: torch.Tensor | np.ndarray,
                   labels: torch.Tensor | np.ndarray) -> float:
    """Fraction of images the classifier assigns to their label."""
    return float((predict(classifier, images) == _labels(labels).numpy()).mean())


def train_domain_classifier(train_images: torch.Tensor | np.ndarray,
                            train_labels: torch.Tensor | np.ndarray,
                            val_images: torch.Tensor | np.ndarray,
                            val_labels: torch.Tensor | np.ndarray,
                            epochs: int = 10, batch_size: int = 64, lr: float = 2e-3,
                            seed: int = 0) -> tuple[DomainClassifier, float]:
    """Train on CPU with AdamW and a cosine schedule; return the model and its val accuracy.

    The caller's global RNG state is left untouched (init and dropout draw from a forked one).
    Training runs on one CPU thread: the weights, and so the FID's feature space, would
    otherwise depend on the caller's thread count (2 threads gave another classifier than 1,
    and an FID 4 points apart).
    """
    x, y = as_float_images(train_images), _labels(train_labels)
    num_classes = int(max(y.max().item(), _labels(val_labels).max().item())) + 1
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        model = DomainClassifier(num_classes)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = math.ceil(len(x) / batch_size)
        total = epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        model.train()
        for epoch in tqdm(range(epochs), desc="domain classifier", unit="epoch",
                          disable=None, leave=False):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = order[i: i + batch_size]
                loss = F.cross_entropy(model(_translate(x[idx], g)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            log.debug("domain classifier epoch %d loss %.4f", epoch, loss.item())
    model.eval()
    acc = class_accuracy(model, val_images, val_labels)
    log.info("domain classifier: val accuracy %.4f after %d epochs (%.1f s)", acc, epochs,
             time.perf_counter() - start)
    return model, acc


def save_classifier(model: DomainClassifier, path: str | os.PathLike,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Weights, architecture and metadata in one file, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": model.state_dict(), "config": model.config,
               "metadata": dict(metadata or {})}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_classifier(path: str | os.PathLike,
                    map_location: str | torch.device = "cpu") -> DomainClassifier:
    """A saved classifier in eval mode, with its metadata in `.metadata`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsMissingError(
            f"domain classifier {path} not found: train one with train_domain_classifier and "
            f"save_classifier")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = DomainClassifier(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    model.metadata = payload["metadata"]
    return model.eval()

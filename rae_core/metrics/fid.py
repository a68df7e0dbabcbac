"""Fréchet distance between Gaussian fits of two feature sets (FID, rFID).

Statistics always carry the name of the extractor that produced them, and distances between
statistics of different extractors are refused: an Inception FID and a domain-classifier FID
are different numbers on different scales.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rae_core.errors import DataError
from rae_core.metrics.features import FeatureExtractor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance (ddof = 1, as clean-fid) of n feature vectors of one extractor."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str

    @classmethod
    def from_features(cls, feats: np.ndarray, extractor: str = "unnamed") -> FeatureStats:
        return StatsAccumulator(extractor).update(feats).stats()

    def save(self, path: str | os.PathLike, **arrays: np.ndarray) -> Path:
        """Write as .npz atomically, with any extra named `arrays` beside the statistics (load
        reads the statistics only)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:  # a file object stops numpy from appending ".npz"
            np.savez(f, mu=self.mu, sigma=self.sigma, n=self.n, extractor=self.extractor,
                     **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"FID statistics file {path} not found: compute it with "
                            f"compute_reference_stats")
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], int(z["n"]), str(z["extractor"]))


class StatsAccumulator:
    """FeatureStats of features that arrive in chunks, in O(d^2) memory whatever their number.

    Each chunk's mean and centred scatter matrix (float64) are merged with Chan et al.'s
    pairwise update rather than summing raw outer products, whose difference from n mu mu^T
    cancels badly when features have large means. The result equals the statistics of all
    features concatenated, up to float rounding, whatever the chunking; accumulators of disjoint
    parts (e.g. of parallel workers) merge the same way.
    """

    def __init__(self, extractor: str = "unnamed"):
        self.extractor = extractor
        self.n = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of outer products of deviations

    def update(self, feats: np.ndarray) -> StatsAccumulator:
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2:
            raise ValueError(f"features must be (n, d), got shape {feats.shape}")
        if len(feats) == 0:
            return self
        mean = feats.mean(axis=0)
        centred = feats - mean
        return self._add(len(feats), mean, centred.T @ centred)

    def merge(self, other: StatsAccumulator) -> StatsAccumulator:
        if other.extractor != self.extractor:
            raise DataError(f"cannot merge FID statistics of extractor '{other.extractor}' into "
                            f"'{self.extractor}'")
        return self._add(other.n, other._mean, other._scatter) if other.n else self

    def _add(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> StatsAccumulator:
        if self.n == 0:
            self.n, self._mean, self._scatter = n, mean, scatter
            return self
        if mean.shape != self._mean.shape:
            raise ValueError(f"features of dimension {mean.shape[0]} added to statistics of "
                             f"dimension {self._mean.shape[0]}")
        total = self.n + n
        delta = mean - self._mean
        # No in-place updates: a merged accumulator's arrays may be shared with another one.
        self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.n * n / total)
        self._mean = self._mean + delta * (n / total)
        self.n = total
        return self

    def stats(self) -> FeatureStats:
        """Mean and covariance (ddof = 1) of everything added so far."""
        if self.n == 0:
            raise ValueError(f"no features accumulated for extractor {self.extractor}")
        d = len(self._mean)
        if self.n <= d:
            log.warning("FID statistics from %d samples of %d-d features (%s): the covariance is "
                        "rank-deficient and the FID biased; use more than %d samples",
                        self.n, d, self.extractor, d)
        return FeatureStats(self._mean, self._scatter / (self.n - 1), self.n, self.extractor)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr (S_a S_b)^(1/2) is taken as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S_a^(1/2) S_b S_a^(1/2) (same spectrum as S_a S_b): real and stable even for
    singular covariances, where the general sqrtm needs clean-fid's diagonal offset.
    """
    if a.extractor != b.extractor:
        raise DataError(f"cannot compare FID statistics of extractor '{a.extractor}' with "
                        f"'{b.extractor}': recompute both with one extractor")
    if a.mu.shape != b.mu.shape:
        raise DataError(f"FID statistics of different dimensions {a.mu.shape} and {b.mu.shape}")
    root_a = _psd_sqrt(a.sigma)
    eig = np.linalg.eigvalsh(root_a @ b.sigma @ root_a)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets of one extractor."""
    return frechet_distance(FeatureStats.from_features(feats_a),
                            FeatureStats.from_features(feats_b))


def compute_reference_stats(images: torch.Tensor | np.ndarray, extractor: FeatureExtractor,
                            cache_path: str | os.PathLike) -> FeatureStats:
    """Statistics of the reference images, computed once and reused from `cache_path`.

    A cached file of another extractor or another image count is stale: it is recomputed and
    overwritten (with a warning), never silently used.
    """
    cache_path = Path(cache_path)
    if cache_path.is_file():
        cached = FeatureStats.load(cache_path)
        if cached.extractor == extractor.name and cached.n == len(images):
            return cached
        log.warning("recomputing %s: cached for extractor %s with %d images, wanted %s with %d",
                    cache_path, cached.extractor, cached.n, extractor.name, len(images))
    stats = FeatureStats.from_features(extractor(images), extractor.name)
    stats.save(cache_path)
    return stats

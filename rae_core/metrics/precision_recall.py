"""Improved precision and recall (Kynkäänniemi et al., 2019).

Each set's manifold is the union of balls around its points, each ball reaching to the point's
k-th nearest neighbour within the set. Precision is the fraction of fake points inside the real
manifold (quality); recall the fraction of real points inside the fake manifold (coverage).
Distances are exact (float64), computed in row blocks to bound memory; every row is complete
within its block, so results do not depend on the block size (beyond float64 rounding).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from tqdm import tqdm


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    d = (a * a).sum(axis=1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)  # cancellation can dip slightly below zero


def _blocks(a: np.ndarray, batch: int, bar: tqdm | None = None) -> Iterator[np.ndarray]:
    for i in range(0, len(a), batch):
        yield a[i: i + batch]
        if bar is not None:
            bar.update()


def knn_radii(feats: np.ndarray, k: int, batch: int = 1000, bar: tqdm | None = None
              ) -> np.ndarray:
    """Squared distance of every point to its k-th nearest other point of the same set."""
    if len(feats) <= k:
        raise ValueError(f"need more than k = {k} points for k-NN radii, got {len(feats)}")
    sq = (feats * feats).sum(axis=1)
    # Column 0 of each sorted row is the point itself (distance 0), so index k is the k-th
    # neighbour proper.
    return np.concatenate([np.partition(_sq_dists(blk, feats, sq), k, axis=1)[:, k]
                           for blk in _blocks(feats, batch, bar)])


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch: int,
              bar: tqdm | None = None) -> float:
    """Fraction of points inside at least one ball (centre, radius)."""
    sq = (centres * centres).sum(axis=1)
    inside = [(_sq_dists(blk, centres, sq) <= radii[None, :]).any(axis=1)
              for blk in _blocks(points, batch, bar)]
    return float(np.concatenate(inside).mean())


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3,
                     batch: int = 1000) -> tuple[float, float]:
    """(precision, recall) of fake features against real ones with k-NN manifolds.

    Memory peaks at batch x max(N_real, N_fake) float64 distances.
    """
    real = np.asarray(real_feats, dtype=np.float64)
    fake = np.asarray(fake_feats, dtype=np.float64)
    blocks = 2 * (-(-len(real) // batch) + -(-len(fake) // batch))  # each set is read twice
    with tqdm(total=blocks, desc="precision/recall", unit="block", disable=None,
              leave=False) as bar:
        precision = _coverage(fake, real, knn_radii(real, k, batch, bar), batch, bar)
        recall = _coverage(real, fake, knn_radii(fake, k, batch, bar), batch, bar)
    return precision, recall

"""Inception Score: exp E_x KL(p(y|x) || p(y)), mean and std over splits (Salimans et al.)."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, xlogy


def _as_probs(scores: np.ndarray) -> np.ndarray:
    """Rows that are non-negative and sum to 1 are probabilities already; others are logits."""
    if (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4):
        return scores
    return np.exp(log_softmax(scores, axis=1))


def inception_score(scores: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the IS over `splits` equal-as-possible chunks of a fixed shuffle.

    `scores` are (N, K) class logits or probabilities. The samples are shuffled with `seed`
    before they are split: chunks of class-ordered samples (as the sample stage writes them)
    would each hold a tenth of the classes and cap the IS near K / splits.
    """
    probs = _as_probs(np.asarray(scores, dtype=np.float64))
    n = len(probs)
    if n < splits:
        raise ValueError(f"inception_score needs at least {splits} samples, got {n}")
    probs = probs[np.random.default_rng(seed).permutation(n)]
    values = []
    for i in range(splits):
        part = probs[i * n // splits: (i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        # xlogy: 0 * log 0 = 0 for one-hot predictions.
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)
        values.append(np.exp(kl.mean()))
    return float(np.mean(values)), float(np.std(values))

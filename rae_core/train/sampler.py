"""Step-indexed data order: batch `step` is a pure function of (seed, step), so a resumed run
reads exactly the images an uninterrupted run would have, with no loader state to save."""

from __future__ import annotations

import torch


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the global batch `step`: consecutive slices of per-epoch permutations."""
    start = step * batch
    out, cached = [], {}
    for pos in range(start, start + batch):
        epoch, i = divmod(pos, n)
        if epoch not in cached:
            cached[epoch] = _epoch_perm(n, seed, epoch)
        out.append(cached[epoch][i])
    return torch.stack(out)


def rank_slice(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = len(indices) // world
    return indices[rank * per: (rank + 1) * per]


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of all randomness (noise, time, dropout, masks) of one step on one rank."""
    return (seed * 1_000_003 + step) * 1009 + rank


class StepBatchSampler(torch.utils.data.Sampler):
    """A DataLoader batch sampler yielding this rank's indices from `start_step` to `steps`."""

    def __init__(self, n: int, batch: int, seed: int, start_step: int, steps: int,
                 rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed = n, batch, seed
        self.start, self.steps, self.rank, self.world = start_step, steps, rank, world

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        for step in range(self.start, self.steps):
            idx = batch_indices(self.n, self.batch, self.seed, step)
            yield rank_slice(idx, self.rank, self.world).tolist()

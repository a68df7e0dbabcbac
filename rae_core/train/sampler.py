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


class BatchDraws:
    """The per-sample randomness of one step's global batch, of which this rank keeps its rows.

    Every rank draws the whole global batch's values from one generator seeded by (seed, step)
    alone, in the same order, and keeps rows [rank * n, (rank + 1) * n): sample i of the global
    batch gets the same draw whatever the worker count, so W workers compute what one would.
    Drawn on the CPU; the callers move what they draw to their device.
    """

    def __init__(self, seed: int, step: int, rank: int = 0, world: int = 1):
        self.generator = torch.Generator().manual_seed(step_seed(seed, step))
        self.rank, self.world = rank, world

    def rows(self, n: int, draw) -> torch.Tensor:
        """This rank's n rows of draw(m, generator), a draw of the global m = n x world rows."""
        return draw(n * self.world, self.generator)[self.rank * n:(self.rank + 1) * n]


def per_sample(generator, n: int, draw) -> torch.Tensor:
    """n rows of draw(m, g): under a BatchDraws this rank's rows of the global batch's draw,
    else draw(n, generator) itself (a torch.Generator or None)."""
    if isinstance(generator, BatchDraws):
        return generator.rows(n, draw)
    return draw(n, generator)


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

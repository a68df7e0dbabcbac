"""Training batches by step, read ahead by DataLoader worker processes (data.loader).

The order is the step sampler's (rae_core.train.sampler): batch `step` holds the same indices
whatever the worker count. Workers only `read` a batch (decode its images); what is drawn from
the step's generator (the flips) is drawn in the training process by the source's `finish`, so
a run's results do not depend on data.loader.workers. With 0 workers nothing changes: each
batch is read in the step that uses it.
"""

from __future__ import annotations

import torch

from rae_core.train.sampler import StepBatchSampler, batch_indices, rank_slice


class _Reads(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole batches: the sampler's index lists."""

    def __init__(self, source):
        self.source = source

    def __getitem__(self, idx: list[int]):
        return self.source.read(torch.tensor(idx, dtype=torch.long))


class StepLoader:
    """`get(step, generator)`: this rank's batch of `step`, as `source.get` would return it.

    A source that has `read` and `finish` is read ahead by `workers` processes, `prefetch`
    batches each, pinned when `pin`; others (memory-mapped latent shards, which need no
    decoding) are read in the step. A step other than the next one (a resume, or a guard's
    restore of a checkpoint) starts the workers again from there.
    """

    def __init__(self, source, batch: int, seed: int, total: int, rank: int = 0, world: int = 1,
                 workers: int = 0, prefetch: int = 2, pin: bool = False):
        self.source, self.batch, self.seed, self.total = source, batch, seed, total
        self.rank, self.world = rank, world
        self.workers = workers if hasattr(source, "read") else 0
        self.prefetch, self.pin = prefetch, pin
        self._batches, self._next = None, None

    def __len__(self) -> int:
        return len(self.source)

    def indices(self, step: int) -> torch.Tensor:
        return rank_slice(batch_indices(len(self.source), self.batch, self.seed, step),
                          self.rank, self.world)

    def _start(self, step: int) -> None:
        sampler = StepBatchSampler(len(self.source), self.batch, self.seed, step, self.total,
                                   self.rank, self.world)
        # batch_size=None: each sampled index list is one item, read whole by one worker
        self._batches = iter(torch.utils.data.DataLoader(
            _Reads(self.source), sampler=sampler, batch_size=None, num_workers=self.workers,
            prefetch_factor=self.prefetch, pin_memory=self.pin))

    def get(self, step: int, generator: torch.Generator):
        if not self.workers:
            return self.source.get(self.indices(step), generator)
        if step != self._next:
            self._start(step)
        self._next = step + 1
        return self.source.finish(*next(self._batches), generator)


def step_loader(source, cfg, device: torch.device, batch: int, total: int, rank: int = 0,
                world: int = 1) -> StepLoader:
    """A StepLoader over `source` with the run's data.loader settings."""
    opts = cfg.data.loader
    return StepLoader(source, batch, cfg.seed, total, rank, world, workers=opts.workers,
                      prefetch=opts.prefetch, pin=opts.pin_memory and device.type == "cuda")


class _RangeReads(torch.utils.data.Dataset):
    """Batches of an ImageFolderDataset by index list: images and labels, or, to be decoded on
    the GPU, what rae_core.data.jpeg.read_encoded reads of each file."""

    def __init__(self, dataset, encoded: bool):
        self.dataset, self.encoded = dataset, encoded

    def __getitem__(self, idx: list[int]):
        labels = torch.tensor([self.dataset.index.labels[i] for i in idx], dtype=torch.long)
        if not self.encoded:
            return torch.stack([self.dataset.pixels(i) for i in idx]), labels  # uint8
        from rae_core.data.jpeg import read_encoded

        items = [read_encoded(self.dataset.index.files[i], self.dataset.resolution) for i in idx]
        return [t for t, _ in items], [e for _, e in items], labels, idx


def range_batches(dataset, start: int, end: int, batch: int, cfg):
    """Images [start, end) of an ImageFolderDataset in file order, `batch` at a time, read by
    data.loader.workers processes: (images (n, 3, R, R) in [0, 1], labels (n,)). With
    extract.gpu_decode the JPEGs are decoded on the run's GPU and the images are there; else
    they are on the CPU (pinned where the run computes on a GPU)."""
    from rae_core import device as devices
    from rae_core.data.folder import to_unit
    from rae_core.data.jpeg import decode_batch, decode_device

    gpu = cfg.extract.gpu_decode
    target = decode_device(cfg) if gpu else devices.of(cfg)
    opts = cfg.data.loader
    chunks = [list(range(i, min(i + batch, end))) for i in range(start, end, batch)]
    loader = torch.utils.data.DataLoader(
        _RangeReads(dataset, gpu), sampler=chunks, batch_size=None, num_workers=opts.workers,
        prefetch_factor=opts.prefetch if opts.workers else None,
        pin_memory=opts.pin_memory and target.type == "cuda")
    for item in loader:
        if not gpu:
            yield to_unit(item[0]), item[1]
            continue
        items, encoded, labels, idx = item
        files = [dataset.index.files[i] for i in idx]
        yield decode_batch(items, encoded, files, dataset.resolution, target), labels

"""Latent shards written by `extract` and the sources the DiT trainer reads batches from.

A shard holds the raw (un-normalised) latents of a run of training images under both horizontal
flips, (n, 2, C, H, W); a source picks one flip at random per sample and normalises. Each shard
has its checksum beside it (rae_core.store): `extract` re-makes a shard that fails it or fails
to load; a source, which maps the shards into memory rather than reading them through, checks
only that each loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rae_core.errors import DataError
from rae_core.store import safe_load, verify
from rae_core.train.sampler import per_sample

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REMAKE = "re-make it with `rae stage extract --force`"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.pt"


def load_shard(path: Path, hint: str = REMAKE) -> dict:
    """A shard's tensors, memory-mapped; DataError naming it when it cannot be loaded."""
    return safe_load(path, hint, mmap=True)


def reusable(path: Path) -> bool:
    """Whether `extract` may keep a finished shard: it exists, matches its checksum and loads.
    A damaged one is named in a warning, to be re-made."""
    if not path.exists():
        return False
    try:
        verify(path, "re-making it")
        load_shard(path, "re-making it")
    except DataError as e:
        log.warning("extract: %s", e)
        return False
    return True


def read_manifest(latents_dir: Path) -> dict:
    path = Path(latents_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"{path}: latent shards not found; run `rae stage extract` first "
                        "or set generator.latents=online")
    return json.loads(path.read_text())


class ShardSource:
    """All shards memory-mapped; `get` returns normalised latents and labels for indices.

    Each shard's latents stay a view of its file: a batch is gathered from the shards its
    indices fall in, so only the pages of those latents are ever read (ImageNet's shards are
    ~300 GB as float32).
    """

    def __init__(self, latents_dir: Path, stats, expected_identity: dict, hflip: bool = True):
        manifest = read_manifest(latents_dir)
        if manifest["identity"] != expected_identity:
            raise DataError(f"{latents_dir}: latents were extracted with {manifest['identity']} "
                            f"but the configuration needs {expected_identity}; re-run extract")
        parts = [load_shard(Path(latents_dir) / s) for s in manifest["shards"]]
        self.shards = [p["latents"] for p in parts]  # each (n_s, 2, C, H, W), memory-mapped
        self.labels = torch.cat([p["labels"] for p in parts])  # (N,): 8 bytes an image
        self.starts = torch.tensor([0] + [len(z) for z in self.shards]).cumsum(0)  # (S + 1,)
        self.stats, self.hflip = stats, hflip

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H, W) of images `idx` under flips `flip` (0 or 1), in the shards' dtype."""
        shard = torch.searchsorted(self.starts, idx, right=True) - 1  # (B,)
        first = self.shards[0]
        out = torch.empty((len(idx), *first.shape[2:]), dtype=first.dtype)
        for s in shard.unique().tolist():
            rows = (shard == s).nonzero().squeeze(1)
            out[rows] = self.shards[s][idx[rows] - self.starts[s], flip[rows]]
        return out

    def get(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        flip = per_sample(generator, len(idx), lambda m, g: torch.randint(0, 2, (m,), generator=g)) \
            if self.hflip else torch.zeros(len(idx), dtype=torch.long)
        z = self.gather(idx, flip).float()  # (B, C, H, W)
        return self.stats.normalize(z), self.labels[idx]


class OnlineSource:
    """Encodes training images on the fly (the ImageNet-scale option: no latent cache).
    `read` (decoding) can run in DataLoader workers, `finish` (flips, encoding) cannot."""

    def __init__(self, dataset, encoder, stats, device, hflip: bool = True):
        self.dataset, self.encoder, self.stats, self.device = dataset, encoder, stats, device
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.dataset[int(i)] for i in idx]
        return torch.stack([im for im, _ in items]), torch.tensor([lab for _, lab in items])

    def finish(self, images: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device)
        flip = (per_sample(generator, len(images), lambda m, g: torch.rand(m, generator=g)) < 0.5) \
            & self.hflip
        images[flip.to(self.device)] = images[flip.to(self.device)].flip(-1)
        z = self.encoder.encode(images)
        return self.stats.normalize(z), labels

    def get(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish(*self.read(idx), generator)

"""Where each stage reads and writes, relative to the project root (all DVC outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# a training loop's checkpoints, newest first (rae_core.train.common.Checkpointer): a save moves
# last.pt to prev.pt before it writes the new last.pt, so a crash between the two leaves prev.pt
CHECKPOINT_FILES = ("last.pt", "prev.pt")


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Paths:
        return cls(Path(root).resolve())

    def dataset(self, data_root: str) -> Path:
        return self.root / data_root

    @property
    def encoder_dir(self) -> Path:
        return self.root / "models" / "encoder"

    @property
    def stats_file(self) -> Path:
        return self.root / "models" / "stats" / "stats.pt"

    @property
    def latents_dir(self) -> Path:
        return self.root / "data" / "latents"

    @property
    def decoder_dir(self) -> Path:
        return self.root / "models" / "decoder"

    @property
    def generator_dir(self) -> Path:
        return self.root / "models" / "generator"

    @property
    def samples_dir(self) -> Path:
        return self.root / "runs" / "samples"

    @property
    def evaluate_dir(self) -> Path:
        return self.root / "runs" / "evaluate"

    @property
    def reference_dir(self) -> Path:
        return self.root / "models" / "reference"

    @property
    def checkpoints(self) -> Path:
        return self.root / "runs" / "checkpoints"

    def has_resume_point(self, stage: str) -> bool:
        """Whether a run of `stage` left a checkpoint its loop would resume from."""
        return any(any(self.checkpoints.glob(f"{stage}-*/{name}")) for name in CHECKPOINT_FILES)

    @property
    def ray_storage(self) -> Path:
        return self.root / "runs" / "ray"

    def metrics_log(self, stage: str) -> Path:
        return self.root / "runs" / "logs" / f"{stage}.jsonl"

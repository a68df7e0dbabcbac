"""Pieces every training loop shares: atomic checkpoints, EMA, lr schedules, metric logs."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rae_core.errors import DataError
from rae_core.store import atomic_save, safe_load

log = logging.getLogger(__name__)


class Checkpointer:
    """A training loop's `last.pt`: model, EMA, optimiser and step, tied to its configuration.

    RNG state and data position need no saving: every step reseeds from (seed, step) and reads
    the batch `batch_indices(seed, step)`, so the step alone restores both exactly, and a
    resumed run reproduces an uninterrupted one bit for bit on the CPU. The learning rate is a
    pure function of the step too.
    """

    def __init__(self, run_dir: str | Path, fingerprint: str, stage: str):
        self.path = Path(run_dir) / "last.pt"
        self.fingerprint, self.stage = fingerprint, stage

    @property
    def last_good(self) -> Path | None:
        """The checkpoint a failing run keeps, if one was written."""
        return self.path if self.path.exists() else None

    def resume(self, **states: Any) -> int:
        """Load every named state (modules, optimisers) from last.pt; returns its step, or 0."""
        if not self.path.exists():
            return 0
        state = safe_load(self.path)
        if state.get("fingerprint") != self.fingerprint:
            raise DataError(f"{self.path}: checkpoint of another configuration "
                            f"({state.get('fingerprint')}, this run is {self.fingerprint}); "
                            "move it away or restore the configuration that wrote it")
        for name, obj in states.items():
            obj.load_state_dict(state[name])
        log.info("%s: resumed at step %d from %s", self.stage, state["step"], self.path)
        return state["step"]

    def save(self, step: int, **states: Any) -> None:
        atomic_save({name: obj.state_dict() for name, obj in states.items()}
                    | {"step": step, "fingerprint": self.fingerprint}, self.path)
        kill_drill(self.stage, step, self.path.parent)


def kill_drill(stage: str, step: int, run_dir: Path) -> None:
    """Reliability drill: RAE_KILL_AT=<stage>:<step> SIGKILLs this process once, right after
    that step's checkpoint, to rehearse a crash (a marker file keeps the resumed run alive)."""
    target = os.environ.get("RAE_KILL_AT", "")
    if target != f"{stage}:{step}":
        return
    marker = run_dir / f".killed-{stage}-{step}"
    if marker.exists():
        return
    marker.touch()
    log.warning("RAE_KILL_AT=%s: killing this process (pid %d)", target, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


class EMA:
    """Exponential moving average of a model's parameters and buffers (kept in fp32)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)


def warmup_cosine(step: int, base_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine from base_lr to min_lr at `total` (the decoder's schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def warmup_constant_linear(step: int, base_lr: float, min_lr: float, warmup: int,
                           decay_start: int, total: int) -> float:
    """Linear warmup, constant, then linear decay to min_lr at `total` (the DiT schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if step < decay_start:
        return base_lr
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return base_lr + (min_lr - base_lr) * progress


def average_gradients(module: nn.Module, world: int) -> None:
    """Average every parameter's gradient over the data-parallel ranks (no-op on one)."""
    if world > 1:
        for p in module.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class MetricsLog:
    """Append-only JSON lines of per-step metrics and artifacts; the flow forwards them to MLflow.

    Keeping tracking out of the loops lets them run in plain torch (tests) or Ray workers alike.
    """

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def metrics(self, step: int, **values: float) -> None:
        clean = {k: float(v) for k, v in values.items()}
        self._write({"step": step, "time": time.time(), "metrics": clean})

    def artifact(self, step: int, path: str | Path) -> None:
        self._write({"step": step, "time": time.time(), "artifact": str(path)})

    def event(self, step: int, message: str) -> None:
        self._write({"step": step, "time": time.time(), "event": message})


def check_finite(loss: torch.Tensor, step: int, stage: str, last_ckpt: Path | None) -> None:
    if not torch.isfinite(loss):
        kept = f"; the last good checkpoint {last_ckpt} is kept" if last_ckpt else ""
        raise FloatingPointError(f"{stage}: loss is {loss.item()} at step {step}{kept}; "
                                 "lower the learning rate or check the inputs")

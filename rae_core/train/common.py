"""Pieces every training loop shares: atomic checkpoints, EMA, lr schedules, metric logs, the
guard against non-finite steps."""

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

from rae_core.errors import ConfigError, DataError, RaeError
from rae_core.paths import CHECKPOINT_FILES
from rae_core.plots import LossCurve
from rae_core.store import atomic_save, checksum_path, safe_load, verify

log = logging.getLogger(__name__)


class Checkpointer:
    """A training loop's `last.pt`: model, EMA, optimiser and step, tied to its configuration.

    RNG state and data position need no saving: every step reseeds from (seed, step) and reads
    the batch `batch_indices(seed, step)`, so the step alone restores both exactly, and a
    resumed run reproduces an uninterrupted one bit for bit on the CPU. The learning rate is a
    pure function of the step too.

    Each save moves the checkpoint before it to `prev.pt`, and each file has its checksum
    beside it: a `last.pt` that a crash left damaged (it fails its checksum or to load) is set
    aside and the run resumes from `prev.pt`, or from step 0 when that is damaged too.
    """

    def __init__(self, run_dir: str | Path, fingerprint: str, stage: str):
        self.path, self.prev = (Path(run_dir) / name for name in CHECKPOINT_FILES)
        self.fingerprint, self.stage = fingerprint, stage

    @property
    def last_good(self) -> Path | None:
        """The checkpoint a resume would load (by its checksum), if one was written."""
        for path in (self.path, self.prev):
            try:
                verify(path)
                return path
            except DataError:
                continue
        return None

    def resume(self, **states: Any) -> int:
        """Load every named state (modules, optimisers) from last.pt, or from prev.pt where
        last.pt is damaged; returns its step, or 0."""
        found = [p for p in (self.path, self.prev) if p.exists()]
        for i, path in enumerate(found):
            aside = path.with_name(f"{path.name}.damaged")  # the next save must not rotate it
            then = f"falling back to {found[i + 1].name}" if i + 1 < len(found) else \
                "starting from step 0"
            hint = f"set aside as {aside.name}, {then}"
            try:
                verify(path, hint)
                state = safe_load(path, hint)
                if not isinstance(state, dict) or "step" not in state:
                    raise DataError(f"{path}: not a checkpoint; {hint}")
            except DataError as e:
                log.warning("%s: %s", self.stage, e)
                path.replace(aside)
                checksum_path(path).unlink(missing_ok=True)
                continue
            if state.get("fingerprint") != self.fingerprint:
                raise DataError(f"{path}: checkpoint of another configuration "
                                f"({state.get('fingerprint')}, this run is {self.fingerprint}); "
                                "move it away or restore the configuration that wrote it")
            for name, obj in states.items():
                obj.load_state_dict(state[name])
            log.info("%s: resumed at step %d from %s", self.stage, state["step"], path)
            return state["step"]
        return 0

    def save(self, step: int, **states: Any) -> None:
        # The checksum moves first: at any crash, last.pt and prev.pt each have their own
        # checksum or none (then loading checks them), never the other's.
        if self.path.exists():
            if checksum_path(self.path).exists():
                os.replace(checksum_path(self.path), checksum_path(self.prev))
            else:
                checksum_path(self.prev).unlink(missing_ok=True)
            os.replace(self.path, self.prev)
        atomic_save({name: obj.state_dict() for name, obj in states.items()}
                    | {"step": step, "fingerprint": self.fingerprint}, self.path, checksum=True)
        kill_drill(self.stage, step, self.path.parent)


def prune_snapshots(run_dir: Path, keep: int) -> list[Path]:
    """Keep `keep` EMA snapshots (ema-step*.pt) of a run, 0 = all: the first and the newest,
    and between them those that leave the steps most evenly spread, so that an FID curve over
    them keeps its shape. Each removal takes the inner snapshot whose neighbours are closest
    together. Returns the removed files."""
    snaps = sorted(run_dir.glob("ema-step*.pt"))
    removed = []
    while keep and len(snaps) > keep:
        if keep == 1:
            i = 0  # the oldest goes until only the newest is left
        else:
            steps = [int(p.stem.removeprefix("ema-step")) for p in snaps]
            i = min(range(1, len(snaps) - 1),
                    key=lambda j: (steps[j + 1] - steps[j - 1], steps[j]))
        removed.append(snaps.pop(i))
        removed[-1].unlink()
    return removed


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


def local_batch(batch: int, world: int, key: str) -> int:
    """Each rank's share of the global batch `batch` (config key `key`): W workers train on the
    same global batches as one, so the batch must split evenly."""
    if batch % world:
        raise ConfigError(f"{key}={batch} does not split over ray.num_workers={world}; use a "
                          f"multiple of {world}")
    return batch // world


class Objective(nn.Module):
    """`fn(module, *args)` as the forward of a module holding `module` (its parameters under
    `module.`): DDP averages gradients only of what runs through its wrapped forward, and a
    loss such as MAE's is a method, not the forward."""

    def __init__(self, module: nn.Module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)


def data_parallel(module: nn.Module, world: int, device: torch.device,
                  find_unused_parameters: bool = False) -> nn.Module:
    """`module` in DistributedDataParallel over the Ray Train workers' process group (gloo on
    the CPU, nccl on GPUs), or itself on one worker. Wrapping broadcasts rank 0's parameters
    and buffers, so every rank starts from the same weights; backward then averages the
    gradients (bucketed, overlapping the backward pass). Optimisers, EMA and checkpoints keep
    using `module` itself, so its state_dict keys are the same whatever the worker count."""
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                   else None, find_unused_parameters=find_unused_parameters)


def global_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of `t` over the ranks (itself on one): a per-rank mean over equal shares of
    the batch becomes the global batch's mean."""
    if world > 1:
        t = t.detach().clone()
        torch.distributed.all_reduce(t)  # a sum: gloo has no ReduceOp.AVG
        t /= world
    return t


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


def grad_norm(module: nn.Module) -> torch.Tensor:
    """The L2 norm of all of a module's gradients, to check, not to clip."""
    return torch.nn.utils.get_total_norm([p.grad for p in module.parameters()
                                          if p.grad is not None])


class NonFiniteError(RaeError):
    """Training stayed non-finite after its remedy."""


class NonFiniteGuard:
    """Rides through numerical faults instead of stopping at the first non-finite loss.

    A step whose loss or gradient norm is not finite is skipped (no optimiser or EMA update)
    and counted (metric `nonfinite_steps`). After `patience` such steps in a row the last good
    checkpoint is restored and training goes on with a remedy: autocast off where the loop ran
    in bf16, half the learning rate otherwise. `patience` more in a row stop the run.
    The loop iterates over `steps(start, total)`, so that a restore takes it back.
    """

    def __init__(self, stage: str, section: str, patience: int, ckpt: Checkpointer,
                 states: dict[str, Any], metrics: MetricsLog, curve: LossCurve, bf16: bool = False,
                 world: int = 1):
        self.stage, self.section, self.patience = stage, section, patience
        self.ckpt, self.states, self.metrics, self.curve = ckpt, states, metrics, curve
        self.bf16, self.world = bf16, world  # bf16: whether the loop autocasts (until the remedy)
        self.lr_scale = 1.0
        self.remedy: str | None = None  # what was tried, once it was
        self.skipped = self.streak = 0
        self._next = 0

    def steps(self, start: int, total: int):
        """The loop's steps from `start` to `total`, back to the checkpoint's after a restore."""
        self._next = start
        while self._next < total:
            step, self._next = self._next, self._next + 1
            yield step

    def finite(self, *values: torch.Tensor) -> bool:
        """Whether the step's losses and gradient norms are all finite, on every rank (a
        finite step ends a run of skipped ones)."""
        flags = [torch.isfinite(v.detach()).all() for v in values]
        ok = torch.stack([f.to(flags[0].device) for f in flags]).all()
        if self.world > 1:
            ok = ok.int()
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if not bool(ok):
            return False
        self.streak = 0
        return True

    def skip(self, step: int) -> None:
        """Count step `step` as skipped; after `patience` in a row, restore and remedy."""
        self.skipped += 1
        self.streak += 1
        log.warning("%s: loss or gradient norm not finite at step %d; update skipped "
                    "(%d in a row, %d in all)", self.stage, step, self.streak, self.skipped)
        self.metrics.metrics(step + 1, nonfinite_steps=self.skipped)
        if self.streak < self.patience:
            return
        if self.remedy is not None:
            kept = self.ckpt.last_good
            raise NonFiniteError(
                f"{self.stage}: loss or gradient norm not finite for {self.patience} steps in a "
                f"row at step {step}, also after {self.remedy}"
                + (f"; the last good checkpoint {kept} is kept" if kept else "")
                + f"; check the inputs or lower {self.section}.lr")
        self.streak = 0
        if self.bf16:
            cure, self.bf16 = "autocast off (fp32)", False
        else:
            cure, self.lr_scale = "half the learning rate", 0.5
        restored = self.ckpt.resume(**self.states)
        if restored:
            self._next = restored
            self.curve.rows = [r for r in self.curve.rows if r["step"] <= restored]
            self.remedy = f"restoring step {restored} with {cure}"
        else:
            self.remedy = f"going on with {cure} (no checkpoint yet)"
        log.warning("%s: %d non-finite steps in a row at step %d (%s.nonfinite_patience); %s",
                    self.stage, self.patience, step, self.section, self.remedy)
        self.metrics.event(step + 1, f"non-finite steps: {self.remedy}")
        self.metrics.metrics(step + 1, nonfinite_restores=1.0, lr_scale=self.lr_scale)

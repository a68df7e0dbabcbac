"""One writer per project: a run or stage holds `runs/.lock` while it writes outputs, so a second
command started beside it refuses at once instead of interleaving writes to the same files."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rae_core.errors import RaeError

_held: dict[Path, int] = {}  # lock files this process holds, with their nesting depth


class ProjectBusyError(RaeError):
    """Another process is writing this project's outputs."""


@contextmanager
def project_lock(root: str | Path, what: str) -> Iterator[Path]:
    """Hold the project's lock for `what`; re-entrant within one process."""
    path = Path(root).resolve() / "runs" / ".lock"
    if path in _held:
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # the open file is the lock; closed on exit
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ProjectBusyError(f"{path}: {holder} is writing this project's outputs; wait for "
                               "it to finish or run from another folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"`{what}` (pid {os.getpid()})")
    f.flush()
    _held[path] = 1
    try:
        yield path
    finally:
        del _held[path]
        f.close()

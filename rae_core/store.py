"""Writes that never leave a half-written file, and the record each stage leaves of what made
its outputs.

Every write goes to a temporary file beside its target and is renamed over it, so a crash keeps
the old file whole. A file saved with a checksum gets a `<file>.sha256` beside it (in sha256sum's
format), which `verify` compares: a file system's crash can still leave a renamed file truncated
or zeroed. A stage's record (runs/records/<stage>.json) holds the identity of the
configuration, code and inputs that made its outputs and a signature of the outputs as written:
rae_core.provenance reads it to skip a stage that is finished and to recognise an output made
under another configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rae_core.errors import DataError


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.sha256")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _write_checksum(path: Path, digest: str) -> None:
    sidecar = checksum_path(path)
    tmp = _tmp(sidecar)
    tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(tmp, sidecar)


def atomic_save(obj: Any, path: str | Path, checksum: bool = False) -> None:
    """torch.save to a temporary file, then rename: an interrupted write keeps the old file.
    With `checksum`, the file's `<file>.sha256` follows it."""
    import torch

    path = Path(path)
    tmp = _tmp(path)
    torch.save(obj, tmp)
    if checksum:
        digest = file_sha256(tmp)  # read back from the page cache, not the disk
        # no stale checksum beside the new file: one without any is checked by loading
        checksum_path(path).unlink(missing_ok=True)
    os.replace(tmp, path)
    if checksum:
        _write_checksum(path, digest)


def verify(path: str | Path, hint: str = "re-run the stage that writes it") -> None:
    """DataError naming `path` when it is missing or differs from its `<file>.sha256`, ending
    with `hint` (what to do). A file without a checksum passes: its loader's checks are the
    only ones then."""
    path, sidecar = Path(path), checksum_path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; {hint}")
    if sidecar.exists() and sidecar.read_text()[:64] != file_sha256(path):
        raise DataError(f"{path}: damaged, its sha256 differs from {sidecar.name}; {hint}")


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def safe_load(path: str | Path, hint: str = "delete it and re-run the stage that writes it",
              mmap: bool = False) -> Any:
    """torch.load with weights_only=True; a damaged file raises DataError naming it, ending
    with `hint` (what to do)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; run the stage that writes it first") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{path}: cannot be loaded ({type(e).__name__}); {hint}") from None


def signature(paths: list[Path], root: Path) -> str:
    """A hash of the names and sizes of every file under `paths` (a link: its target), enough to
    notice an output deleted, truncated or replaced since its record was written; '' when one
    of them is missing."""
    h = hashlib.sha256()
    for p in paths:
        if p.is_symlink():
            h.update(f"{p.relative_to(root)}->{os.readlink(p)}\n".encode())
            continue
        if not p.exists():
            return ""
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if not f.name.startswith("."):  # temporary files of writes in flight
                h.update(f"{f.relative_to(root)}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def read_record(path: Path) -> dict | None:
    """A stage's record, or None when there is none or it cannot be read (then it is remade)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "key" in rec else None

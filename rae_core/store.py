"""Writes that never leave a half-written file, and the record each stage leaves of what made
its outputs.

Every write goes to a temporary file beside its target and is renamed over it, so a crash keeps
the old file whole. A stage's record (runs/records/<stage>.json) holds the identity of the
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


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: an interrupted write keeps the old file."""
    import torch

    path = Path(path)
    tmp = _tmp(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def safe_load(path: str | Path) -> Any:
    """torch.load with weights_only=True; a damaged file raises DataError naming it."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; run the stage that writes it first") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{path}: cannot be loaded ({type(e).__name__}); delete it and re-run "
                        "the stage that writes it") from None


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

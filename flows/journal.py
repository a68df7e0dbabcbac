"""What a run could not log while its tracking server was down: one journal per MLflow run under
`runs/tracking/`, which `rae sync` replays into that run once the server answers.

A journal (`<run>.json`, rewritten atomically after every change) holds the run's tracking
calls in order, each an operation name and its JSON arguments; the metric lines of a stage's
log that were not sent are copied beside it (`<run>.jsonl`), since the next attempt of the stage
starts its log afresh. A run whose creation failed has a local id (`offline-...`) until sync
creates it; `ids.json` maps such ids to the runs made for them, so a stage run's parent is
found whichever journal goes first. Plain files only: no MLflow import here.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from rae_core.store import read_record, write_json

OFFLINE = "offline-"
IDS = "ids.json"


def folder(root: Path) -> Path:
    return Path(root) / "runs" / "tracking"


def offline_id() -> str:
    return OFFLINE + uuid.uuid4().hex[:16]


def is_offline(run_id: str | None) -> bool:
    return bool(run_id) and run_id.startswith(OFFLINE)


class Journal:
    """The pending tracking calls of one run."""

    def __init__(self, root: Path, path: Path, data: dict):
        self.root, self.path, self.data = Path(root), path, data

    @classmethod
    def open(cls, root: Path, run_id: str, name: str, uri: str) -> Journal:
        path = folder(root) / f"{run_id}.json"
        data = read_record(path) or {"key": run_id, "run": run_id, "name": name, "uri": uri,
                                     "created": time.time(), "ops": []}
        return cls(root, path, data)

    @classmethod
    def all(cls, root: Path) -> list[Journal]:
        """Every journal of the project, oldest first (a parent run before its stages')."""
        found = [cls(root, p, rec) for p in folder(root).glob("*.json")
                 if p.name != IDS and (rec := read_record(p))]
        return sorted(found, key=lambda j: j.data["created"])

    @property
    def run(self) -> str:
        return self.data["run"]

    @property
    def ops(self) -> list[dict]:
        return self.data["ops"]

    @property
    def tail(self) -> Path:
        return self.path.with_suffix(".jsonl")

    def append(self, op: str, args: dict[str, Any]) -> None:
        self.ops.append({"op": op, "args": args})
        self.save()

    def append_lines(self, lines: list[str]) -> None:
        """Metric lines of the stage's log, kept here for `rae sync` (their op reads them)."""
        offset = self.tail.stat().st_size if self.tail.exists() else 0
        self.tail.parent.mkdir(parents=True, exist_ok=True)
        with open(self.tail, "a") as f:
            f.writelines(lines)
        self.append("lines", {"offset": offset})

    def save(self) -> None:
        write_json(self.path, self.data)

    def done(self, op: dict) -> None:
        """`op` reached the run: it leaves the journal, which goes once it is empty."""
        self.ops.remove(op)
        if self.ops:
            self.save()
            return
        self.path.unlink(missing_ok=True)
        self.tail.unlink(missing_ok=True)

    def created(self, real_id: str) -> None:
        """The run now exists under `real_id`: later ops and journals refer to it."""
        ids_path = folder(self.root) / IDS
        ids = read_record(ids_path) or {"key": "ids"}
        ids[self.run] = real_id
        write_json(ids_path, ids)
        self.data["run"] = real_id
        self.save()

    def counts(self) -> dict[str, int]:
        """How many metric lines, metrics, params, tags, artifacts and registrations wait."""
        n = dict.fromkeys(("metric lines", "metrics", "params", "tags", "artifacts",
                           "model registration"), 0)
        for op in self.ops:
            args = op["args"]
            if op["op"] == "create":
                n["params"] += len(args["params"])
            elif op["op"] == "log":
                n["metrics"] += len(args["metrics"])
                n["tags"] += len(args["tags"])
            elif op["op"] == "tags":
                n["tags"] += len(args["tags"])
            elif op["op"] == "artifact":
                n["artifacts"] += 1
            elif op["op"] == "register":
                n["model registration"] += 1
            elif op["op"] == "lines":
                records = self.lines(args["offset"])
                n["metric lines"] += sum("metrics" in r for r in records)
                n["artifacts"] += sum("artifact" in r for r in records)
        return n

    def lines(self, offset: int) -> list[dict]:
        """The records kept from `offset` of the tail file to the next op's."""
        starts = sorted(op["args"]["offset"] for op in self.ops if op["op"] == "lines")
        end = next((s for s in starts if s > offset), None)
        with open(self.tail, "rb") as f:
            f.seek(offset)
            data = f.read() if end is None else f.read(end - offset)
        return [json.loads(ln) for ln in data.decode().splitlines() if ln.strip()]

    def summary(self) -> str:
        """e.g. `run 3f2a... (train-generator): 57 metric lines, 1 artifact, the model
        registration`."""
        parts = [f"the {k}" if k == "model registration" else f"{v} {k if v > 1 else k[:-1]}"
                 for k, v in self.counts().items() if v]
        return f"run {self.run} ({self.data['name']}): {', '.join(parts) or 'its status'}"


def resolve(root: Path, value: Any) -> Any:
    """`value` with every offline run id that has become a real run replaced by that run's id."""
    ids = read_record(folder(root) / IDS) or {}

    def sub(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x) for x in v]
        return ids.get(v, v) if isinstance(v, str) and is_offline(v) else v

    return sub(value)

"""What made each stage's outputs, and whether a stage has to run again.

A stage's identity is a hash of its parameters (the params.yaml sections it reads, as dvc.yaml
lists them), the code of rae_core and the identities of the stages it reads from. When a stage
completes, its record stores that identity and a signature of its outputs. A later run skips
the stage when both still match and its upstream's outputs are those it read; anything else
makes it run again, and the decision says why. A stage forced to run again under the same
identity makes equivalent outputs, so its downstream stays finished unless the files differ.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from rae_core.config import Config, flatten
from rae_core.paths import Paths
from rae_core.store import read_record, signature, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    params: tuple[str, ...]  # dotted sections or keys of params.yaml
    upstream: tuple[str, ...]  # stages whose outputs it reads
    outputs: tuple[str, ...]  # paths relative to the project, as in dvc.yaml's outs


SPECS: dict[str, StageSpec] = {
    "prepare": StageSpec(("seed", "data"), (), ("data/dataset.json",)),
    "pretrain-encoder": StageSpec(
        ("seed", "data", "autoencoder", "encoder", "decoder.lpips_weight",
         "decoder.lpips_weights", "decoder.gan"), ("prepare",), ("models/encoder",)),
    "stats": StageSpec(("data", "autoencoder", "encoder", "stats"),
                       ("prepare", "pretrain-encoder"), ("models/stats",)),
    "extract": StageSpec(("data", "autoencoder", "encoder", "extract"),
                         ("prepare", "pretrain-encoder"), ("data/latents",)),
    "train-decoder": StageSpec(("seed", "data", "autoencoder", "encoder", "decoder"),
                               ("prepare", "pretrain-encoder"), ("models/decoder",)),
    "train-generator": StageSpec(("seed", "data", "autoencoder", "encoder", "generator"),
                                 ("prepare", "pretrain-encoder", "stats", "extract"),
                                 ("models/generator",)),
    "sample": StageSpec(("sample",), ("train-generator", "train-decoder", "stats"),
                        ("runs/samples",)),
    "evaluate": StageSpec(("evaluate",), ("sample", "train-decoder", "prepare"),
                          ("runs/evaluate/metrics.json", "models/reference")),
}


@cache
def code_identity() -> str:
    """A hash of rae_core's sources: any change of the library's code re-runs every stage
    (cheaper to trust than a per-stage list of modules that can fall out of date)."""
    h = hashlib.sha256()
    pkg = Path(__file__).parent
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def stage_params(name: str, cfg: Config) -> dict:
    """The flattened values of the params a stage reads."""
    flat = cfg.flat()
    out = {}
    for key in SPECS[name].params:
        out |= {k: v for k, v in flat.items() if k == key or k.startswith(key + ".")}
    return out


def identity(name: str, cfg: Config) -> str:
    """The stage's identity under `cfg`: its params, the code and its upstream's identities."""
    h = hashlib.sha256(name.encode())
    h.update(repr(sorted(stage_params(name, cfg).items())).encode())
    h.update(code_identity().encode())
    for up in SPECS[name].upstream:
        h.update(identity(up, cfg).encode())
    return h.hexdigest()[:16]


def record_path(paths: Paths, name: str) -> Path:
    return paths.root / "runs" / "records" / f"{name}.json"


def _signature(name: str, paths: Paths) -> str:
    return signature([paths.root / p for p in SPECS[name].outputs], paths.root)


@dataclass(frozen=True)
class Decision:
    stage: str
    run: bool
    reason: str  # why it runs, or since when it is finished
    outputs: dict  # the recorded outputs of a finished stage

    def line(self) -> str:
        return f"{self.stage}: {'runs' if self.run else 'skipped'} ({self.reason})"


def _changed(name: str, cfg: Config, rec: dict) -> str:
    """Which of the stage's own inputs differ from the record's, in words."""
    before, now = rec.get("params", {}), stage_params(name, cfg)
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if keys:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:3])
        return "params changed: " + shown + (f" and {len(keys) - 3} more" if len(keys) > 3
                                              else "")
    if rec.get("code") != code_identity():
        return "rae_core's code changed"
    return "an upstream stage's inputs changed"


def decide(name: str, cfg: Config, paths: Paths, force: bool = False) -> Decision:
    """Whether `name` must run: it is skipped only when its record matches this configuration,
    code and upstream, and its outputs are as the record left them."""
    if force:
        return Decision(name, True, "--force", {})
    rec = read_record(record_path(paths, name))
    if rec is None:
        return Decision(name, True, "no record of a finished run", {})
    if rec["key"] != identity(name, cfg):
        return Decision(name, True, _changed(name, cfg, rec), {})
    if rec.get("signature") != _signature(name, paths):
        return Decision(name, True, "its outputs changed or are missing since it finished", {})
    for up in SPECS[name].upstream:
        up_rec = read_record(record_path(paths, up))
        if up_rec is None or up_rec.get("signature") != rec.get("upstream", {}).get(up):
            return Decision(name, True, f"{up}'s outputs changed since", {})
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.get("finished", 0)))
    return Decision(name, False, f"unchanged since {when}", rec.get("outputs", {}))


def clear(name: str, paths: Paths) -> None:
    """Forget a stage's record before it runs: a run that fails leaves its outputs unrecorded."""
    record_path(paths, name).unlink(missing_ok=True)


def record(name: str, cfg: Config, paths: Paths, outputs: dict) -> None:
    """The record of a stage that has just completed."""
    write_json(record_path(paths, name), {
        "stage": name, "key": identity(name, cfg), "code": code_identity(),
        "params": stage_params(name, cfg), "preset": cfg.preset,
        "signature": _signature(name, paths), "finished": time.time(),
        "upstream": {up: (read_record(record_path(paths, up)) or {}).get("signature")
                     for up in SPECS[name].upstream},
        "outputs": {k: v for k, v in flatten(outputs).items()
                    if isinstance(v, int | float | str | bool) or v is None}})

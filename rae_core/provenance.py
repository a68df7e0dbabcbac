"""What made each stage's outputs, and whether a stage has to run again.

A stage's identity is a hash of its parameters (the params.yaml sections it reads, as dvc.yaml
lists them), the code of rae_core and the identities of the stages it reads from. When a stage
completes, its record stores that identity and a signature of its outputs. A later run skips
the stage when both still match and its upstream's outputs are those it read; anything else
makes it run again, and the decision says why. A stage forced to run again under the same
identity makes equivalent outputs, so its downstream stays finished unless the files differ.

The same records tell a stage run on its own whether its inputs, at their fixed paths, were
made under this configuration: one of another is refused before anything starts
(check_inputs), and an optional one is passed over (the preview decoder of train-generator).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from rae_core.config import Config, flatten
from rae_core.errors import DataError
from rae_core.paths import Paths
from rae_core.store import read_record, signature, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    params: tuple[str, ...]  # dotted sections or keys of params.yaml
    upstream: tuple[str, ...]  # stages whose outputs it reads
    # paths relative to the project, as in dvc.yaml's outs; ${data.root} is the configured one
    outputs: tuple[str, ...]


SPECS: dict[str, StageSpec] = {
    "prepare": StageSpec(("seed", "data"), (), ("${data.root}.json",)),
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


def outputs(name: str, cfg: Config) -> list[str]:
    """The stage's output paths under `cfg`, as dvc.yaml resolves them from params.yaml."""
    return [p.replace("${data.root}", cfg.data.root) for p in SPECS[name].outputs]


def _signature(name: str, cfg: Config, paths: Paths) -> str:
    return signature([paths.root / p for p in outputs(name, cfg)], paths.root)


@dataclass(frozen=True)
class Decision:
    stage: str
    run: bool
    reason: str  # why it runs, or since when it is finished
    outputs: dict  # the recorded outputs of a finished stage

    def line(self) -> str:
        return f"{self.stage}: {'runs' if self.run else 'skipped'} ({self.reason})"


def _diff(before: dict, now: dict) -> str:
    """The params whose values differ, with both values, in words; '' when none do."""
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _changed(name: str, cfg: Config, rec: dict) -> str:
    """Which of the stage's own inputs differ from the record's, in words."""
    if diff := _diff(rec.get("params", {}), stage_params(name, cfg)):
        return "params changed: " + diff
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
    if rec.get("signature") != _signature(name, cfg, paths):
        return Decision(name, True, "its outputs changed or are missing since it finished", {})
    for up in SPECS[name].upstream:
        up_rec = read_record(record_path(paths, up))
        if up_rec is None or up_rec.get("signature") != rec.get("upstream", {}).get(up):
            return Decision(name, True, f"{up}'s outputs changed since", {})
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.get("finished", 0)))
    return Decision(name, False, f"unchanged since {when}", rec.get("outputs", {}))


def _foreign(name: str, cfg: Config, paths: Paths, rec: dict) -> tuple[str, dict] | None:
    """The first stage, `name` (whose record is `rec`) or one whose outputs went into its
    outputs, that ran under params other than `cfg`'s, with its record; None when all agree.
    Records are followed while they describe the outputs that were read."""
    if _diff(rec.get("params", {}), stage_params(name, cfg)):
        return name, rec
    for up in SPECS[name].upstream:
        up_rec = read_record(record_path(paths, up))
        if up_rec is not None and up_rec.get("signature") == rec.get("upstream", {}).get(up):
            if found := _foreign(up, cfg, paths, up_rec):
                return found
    return None


def _config_id(params: dict) -> str:
    """A short hash of a stage's params: tells two configurations of one preset apart."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def check_inputs(name: str, cfg: Config, paths: Paths, given: list[str] | None = None) -> None:
    """Refuse to run `name` on an input another configuration made: one line naming both
    configurations and the command that re-makes the inputs (`given`: the command line's
    configuration options; default: --preset). Called before any server or worker starts.

    An input is judged by the records that describe it: its own while its signature matches
    the files, then those of the stages it was made from. Code changes do not count (DVC re-runs
    only the stages whose code changed), nor does an output no record describes (restored by
    DVC, or made before records were kept): it is read as it is."""
    stale = []
    for up in SPECS[name].upstream:
        rec = read_record(record_path(paths, up))
        if rec is not None and rec.get("signature") == _signature(up, cfg, paths):
            if found := _foreign(up, cfg, paths, rec):
                stale.append((list(SPECS).index(up), up, *found))
    if not stale:
        return
    stale.sort()
    _, up, stage, rec = stale[0]
    before, now = rec.get("params", {}), stage_params(stage, cfg)
    made = ", ".join(outputs(up, cfg)) + ("" if stage == up else f" (from {stage}'s outputs)")
    options = ["--preset", cfg.preset] if given is None else given
    command = " ".join(["rae", "run", *options, "--until", stale[-1][1]])
    raise DataError(f"{made}: made under preset {rec.get('preset')} (config {_config_id(before)}"
                    f"), but {name} runs under preset {cfg.preset} (config {_config_id(now)}; "
                    f"{stage} params differ: {_diff(before, now)}); re-make {name}'s inputs "
                    f"with `{command}`")


def clear(name: str, paths: Paths) -> None:
    """Forget a stage's record before it runs: a run that fails leaves its outputs unrecorded."""
    record_path(paths, name).unlink(missing_ok=True)


def record(name: str, cfg: Config, paths: Paths, outputs: dict) -> None:
    """The record of a stage that has just completed."""
    write_json(record_path(paths, name), {
        "stage": name, "key": identity(name, cfg), "code": code_identity(),
        "params": stage_params(name, cfg), "preset": cfg.preset,
        "signature": _signature(name, cfg, paths), "finished": time.time(),
        "upstream": {up: (read_record(record_path(paths, up)) or {}).get("signature")
                     for up in SPECS[name].upstream},
        "outputs": {k: v for k, v in flatten(outputs).items()
                    if isinstance(v, int | float | str | bool) or v is None}})

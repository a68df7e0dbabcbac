"""Stage records: a finished stage is skipped until its params, code, upstream or outputs change."""

from pathlib import Path

import pytest
import yaml

from rae_core import provenance
from rae_core.config import from_dict
from rae_core.paths import Paths

ROOT = Path(__file__).resolve().parents[1]


def _outputs(paths: Paths, cfg, name: str, size: int = 4) -> None:
    for rel in provenance.outputs(name, cfg):
        p = paths.root / rel
        target = p / "part.bin" if not p.suffix else p
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x" * size)


def _finish(paths: Paths, cfg, name: str) -> None:
    _outputs(paths, cfg, name)
    provenance.record(name, cfg, paths, {"loss": 0.5, "nested": {"psnr": 25.0}})


@pytest.fixture
def project(tmp_path):
    paths = Paths.at(tmp_path)
    cfg = from_dict({})
    for name in ("prepare", "pretrain-encoder", "stats"):
        _finish(paths, cfg, name)
    return paths, cfg


def test_a_stage_without_a_record_runs(tmp_path):
    d = provenance.decide("prepare", from_dict({}), Paths.at(tmp_path))
    assert d.run and d.reason == "no record of a finished run"


def test_a_finished_stage_is_skipped_with_its_recorded_outputs(project):
    paths, cfg = project
    d = provenance.decide("stats", cfg, paths)
    assert not d.run and d.reason.startswith("unchanged since")
    assert d.outputs == {"loss": 0.5, "nested.psnr": 25.0}
    assert d.line().startswith("stats: skipped (unchanged since")


def test_force_runs_a_finished_stage(project):
    paths, cfg = project
    assert provenance.decide("stats", cfg, paths, force=True).reason == "--force"


def test_a_changed_param_of_the_stage_names_the_key_and_both_values(project):
    paths, _ = project
    d = provenance.decide("stats", from_dict({"stats": {"shards": 3}}), paths)
    assert d.run and d.reason == "params changed: stats.shards: 2 -> 3"


def test_a_param_of_another_stage_leaves_it_finished(project):
    paths, _ = project
    assert not provenance.decide("stats", from_dict({"generator": {"steps": 5}}), paths).run


def test_an_upstream_param_change_runs_every_stage_below_it(project):
    """sample reads only `sample` params, but a generator trained for longer is another input."""
    paths, cfg = project
    for name in ("extract", "train-decoder", "train-generator", "sample"):
        _finish(paths, cfg, name)
    assert not provenance.decide("sample", cfg, paths).run
    d = provenance.decide("sample", from_dict({"generator": {"steps": 5}}), paths)
    assert d.run and d.reason == "an upstream stage's inputs changed"


def test_missing_or_altered_outputs_run_the_stage_again(project):
    paths, cfg = project
    (paths.root / "models" / "stats" / "part.bin").write_bytes(b"")  # truncated
    assert provenance.decide("stats", cfg, paths).reason.startswith("its outputs changed")
    _finish(paths, cfg, "stats")
    (paths.root / "models" / "stats" / "part.bin").unlink()
    assert provenance.decide("stats", cfg, paths).run


def test_upstream_outputs_that_differ_from_those_read_run_the_stage(project):
    paths, cfg = project
    _outputs(paths, cfg, "pretrain-encoder", size=8)  # a different encoder than stats read
    provenance.record("pretrain-encoder", cfg, paths, {})
    d = provenance.decide("stats", cfg, paths)
    assert d.run and d.reason == "pretrain-encoder's outputs changed since"


def test_a_forced_rerun_that_makes_the_same_files_leaves_downstream_finished(project):
    paths, cfg = project
    _finish(paths, cfg, "pretrain-encoder")
    assert not provenance.decide("stats", cfg, paths).run


def test_a_code_change_runs_every_stage(project, monkeypatch):
    paths, cfg = project
    monkeypatch.setattr(provenance, "code_identity", lambda: "another")
    d = provenance.decide("prepare", cfg, paths)
    assert d.run and d.reason == "rae_core's code changed"


def test_the_code_identity_covers_every_module_of_the_library():
    provenance.code_identity.cache_clear()
    first = provenance.code_identity()
    assert len(first) == 16 and first == provenance.code_identity()


def test_a_clear_forgets_the_record_so_a_failed_run_is_not_finished(project):
    paths, cfg = project
    provenance.clear("stats", paths)
    assert provenance.decide("stats", cfg, paths).reason == "no record of a finished run"


def test_an_unreadable_record_counts_as_none(project):
    paths, cfg = project
    provenance.record_path(paths, "stats").write_text("{trunc")
    assert provenance.decide("stats", cfg, paths).reason == "no record of a finished run"


def test_the_stage_specs_match_dvc_yaml():
    """One list of params and outputs per stage: dvc.yaml's and the records' agree."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(provenance.SPECS)
    for name, spec in provenance.SPECS.items():
        assert list(spec.params) == stages[name]["params"], name
        outs = {next(iter(o)) if isinstance(o, dict) else o for o in stages[name]["outs"]}
        outs |= {next(iter(m)) for m in stages[name].get("metrics", [])}
        assert set(spec.outputs) <= outs, name
        for up in spec.upstream:
            assert up in provenance.SPECS and list(provenance.SPECS).index(up) < \
                list(provenance.SPECS).index(name)

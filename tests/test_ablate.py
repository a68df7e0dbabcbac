"""`rae ablate`: matched compute, verdicts and the report (unit), and the smoke ablation end to
end through Prefect, Ray Train and MLflow (e2e)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rae_core import ablations as ablation
from rae_core.errors import ConfigError
from rae_core.presets import load_config

ROOT = Path(__file__).resolve().parents[1]
LETTERS = list(ablation.ABLATIONS)


def _verdict_rows(md: str) -> list[str]:
    """The verdict table's rows: they start with the ablation's letter."""
    return [ln for ln in md.splitlines() if len(ln) > 4 and ln[:2] == "| " and
            ln[2] in LETTERS and ln[3:5] == " |"]


@pytest.fixture(scope="module")
def plan():
    return ablation.make_plan(load_config(None, "smoke"))


@pytest.mark.parametrize("preset", ["smoke", "tiny"])
def test_arms_of_an_ablation_get_equal_training_compute(preset):
    plan = ablation.make_plan(load_config(None, preset))
    arms = {a.name: a for a in plan.arms}
    ref = arms["reference"].train_flops
    for name in ("no-shift", "plain-decoder", "dit", "pixels"):
        assert arms[name].train_flops == pytest.approx(ref, rel=0.03), name
    assert arms["dit"].model != arms["reference"].model  # (d) compares two architectures
    widths = [a for a in plan.arms if a.overfit]
    assert len(widths) == 3
    for a in widths:
        assert a.train_flops == pytest.approx(widths[-1].train_flops, rel=0.03), a.name
    # narrower models are cheaper per step, so equal compute gives them more steps
    assert widths[0].steps > widths[1].steps > widths[2].steps
    assert len(plan.seeds) == ablation.SIZES[preset].seeds


def test_matching_picks_the_closest_depth_and_the_steps_of_equal_flops():
    from rae_core.models import model_flops_per_image

    target = model_flops_per_image("DiTDH-tiny", 64, 4)
    depth = ablation.matched_depth("DiT-tiny", 64, 4, target, hidden=192)
    costs = {d: model_flops_per_image("DiT-tiny", 64, 4, hidden=192, depth=d) for d in (1, 2, 3)}
    assert depth == 2 and costs[1] < target < costs[3]
    steps = ablation.matched_steps(ablation.train_flops(target, 128, 600), costs[depth], 128)
    assert ablation.train_flops(costs[depth], 128, steps) == pytest.approx(
        ablation.train_flops(target, 128, 600), rel=0.01)


def test_every_arm_config_is_valid_and_differs_only_where_it_should(plan):
    from rae_core.config import from_dict

    cfgs = {a.name: from_dict(a.config(plan.base, 3)) for a in plan.arms}
    ref = cfgs["reference"]
    assert ref.seed == ref.sample.seed == 3 and ref.generator.shift is None
    assert cfgs["no-shift"].generator.shift == 1.0
    assert cfgs["plain-decoder"].decoder.noise_tau == 0.0 and ref.decoder.noise_tau == 0.8
    assert cfgs["pixels"].encoder.name == "pixels"
    assert cfgs["dit"].generator.model == cfgs["pixels"].generator.model == "DiT-micro"
    assert cfgs["width-32"].generator.hidden == 32
    # the knobs an ablation varies are pinned, whatever --set says
    other = ablation.make_plan(load_config(None, "smoke", ["generator.shift=2.0",
                                                           "decoder.noise_tau=0.3"]))
    for arm in other.arms:
        c = from_dict(arm.config(other.base, 0))
        assert c.generator.shift == cfgs[arm.name].generator.shift, arm.name
        if not arm.overfit:  # (a) decodes nothing
            assert c.decoder.noise_tau == cfgs[arm.name].decoder.noise_tau, arm.name
    assert {c.tracking.experiment for c in cfgs.values()} == {"rae-ablation"}
    assert plan.arm("plain-decoder").stages == ("train-decoder", "sample", "evaluate")
    assert plan.arm("dit").stages == ("train-generator", "sample", "evaluate")
    assert plan.arm("width-64").stages == ()


def test_a_preset_without_ablation_sizes_is_refused():
    with pytest.raises(ConfigError, match="no ablation sizes"):
        ablation.make_plan(load_config(None, "imagenet256"))


@pytest.mark.parametrize("winner, loser, better, expected", [
    ({0: 1.0, 1: 2.0}, {0: 3.0, 1: 4.0}, "lower", ablation.HOLDS),
    ({0: 5.0, 1: 6.0}, {0: 3.0, 1: 4.0}, "lower", ablation.DOES_NOT_HOLD),
    ({0: 0.9}, {0: 0.5}, "higher", ablation.HOLDS),
    ({0: 0.4}, {0: 0.5}, "higher", ablation.DOES_NOT_HOLD),
    ({0: 0.5}, {0: 0.5}, "higher", ablation.DOES_NOT_HOLD),  # a tie is no improvement
    ({0: 1.0, 1: 9.0, 2: 1.0}, {0: 5.0, 1: 8.0, 2: 5.0}, "lower", ablation.MIXED),
])
def test_verdict_compares_the_arms_seed_by_seed(winner, loser, better, expected):
    assert ablation.verdict(winner, loser, better) == expected


def _fake_results(plan, flip: str | None = None):
    """Numbers for every arm and seed; the paper's direction everywhere except ablation `flip`."""
    results = {}
    for i, arm in enumerate(plan.arms):
        results[arm.name] = {}
        for s in plan.seeds:
            run = f"run-{arm.name}-{s}"
            good = arm.name in ("reference", "dit") or arm.name.startswith("width-") and \
                arm.name != "width-32"
            fid = (10.0 if good else 20.0) + s + 0.1 * i
            if flip == "b" and arm.name == "no-shift":
                fid = 1.0
            results[arm.name][s] = {
                "steps": {"value": float(arm.steps), "run_id": run},
                "train_flops": {"value": arm.train_flops, "run_id": run},
                "fid": {"value": fid, "run_id": run + "-ev"},
                "class_accuracy": {"value": (0.5 if good else 0.4) - 0.01 * i,
                                   "run_id": run + "-ev"},
                "rfid": {"value": 2.0 if arm.name == "plain-decoder" else 3.0, "run_id": run},
                "recon_psnr": {"value": 20.0 if arm.name == "plain-decoder" else 19.0,
                               "run_id": run},
                "overfit_loss": {"value": 0.5 if arm.name == "width-32" else 0.01,
                                 "run_id": run}}
    return results


def test_report_has_a_row_per_claim_and_says_plainly_where_the_paper_does_not_hold(
        plan, tmp_path):
    report = ablation.build_report(plan, _fake_results(plan, flip="b"), "parent", "domain:x",
                                   123.0)
    md = ablation.render_markdown(report)
    table = _verdict_rows(md)
    assert sorted({ln[2] for ln in table}) == LETTERS
    assert len(table) == len(plan.claims)
    verdicts = {(r["ablation"], r["metric"]): r["verdict"] for r in report["claims"]}
    assert verdicts["b", "fid"] == ablation.DOES_NOT_HOLD
    assert all(v == ablation.HOLDS for k, v in verdicts.items() if k != ("b", "fid"))
    assert "| does not hold |" in md
    # both FLOP totals of (d) are reported, with the runs that logged them
    for name in ("reference", "dit"):
        assert report["arms"][name]["train_flops"]["run_id"] == f"run-{name}-0"
    assert set(ablation.parent_metrics(report)) >= {"ablate.wall_s", "b.no-shift.fid.mean"}
    json.dumps(report)
    for letter in LETTERS:
        png = ablation.plot_ablation(report, letter, tmp_path / f"{letter}.png")
        assert png.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------


def _numbers(node, path=""):
    """Every number in report.json: (path, {metric, value, run_id}) or a seed."""
    if isinstance(node, dict):
        if {"metric", "value", "run_id"} <= set(node):
            yield path, node
            return
        for k, v in node.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield path, None


@pytest.mark.e2e
def test_smoke_ablation_end_to_end(tmp_path):
    proj = tmp_path / "project"
    proj.mkdir()
    for item in ("dvc.yaml", "rae_core", "flows"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, proj / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, proj / item)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_HOME", None)
    for cmd in (["params", "--preset", "smoke"], ["ablate", "--preset", "smoke"]):
        res = subprocess.run([sys.executable, "-m", "flows.cli", *cmd], cwd=proj, env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{cmd}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"

    out = proj / "runs" / "ablate" / "smoke"
    md = (out / "report.md").read_text()
    rows = {ln[2] for ln in _verdict_rows(md)}
    assert sorted(rows) == LETTERS
    assert all((out / "plots" / f"{x}.png").exists() for x in LETTERS)
    report = json.loads((out / "report.json").read_text())
    assert {r["ablation"] for r in report["claims"]} == set(LETTERS)

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    numbers = list(_numbers(report))
    bare = [p for p, n in numbers if n is None and not p.startswith(".seeds")
            and not p.endswith(".seed")]
    assert not bare, f"numbers without a run: {bare}"
    runs = {}
    for path, n in numbers:
        if n is None:
            continue
        run = runs.get(n["run_id"]) or client.get_run(n["run_id"])
        runs[n["run_id"]] = run
        assert run.info.status == "FINISHED", path
        assert run.data.metrics[n["metric"]] == n["value"], path

    parent = client.get_run(report["parent_run_id"])
    assert parent.data.tags["rae.kind"] == "ablation"
    assert parent.data.tags["mlflow.runName"] == "ablate-smoke"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.json", "plots"} <= arts
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    arms = {(r.data.tags["rae.arm"], r.data.tags.get("rae.seed")) for r in children}
    assert {(a, "0") for a in report["arms"]} <= arms
    for r in children:
        if r.data.tags["rae.arm"] != "shared":
            assert r.data.tags["rae.ablation"] and r.info.status == "FINISHED"
    # ablation generators stay out of the model registry (and away from its champion alias)
    assert client.search_registered_models() == []

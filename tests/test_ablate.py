"""`rae ablate`: matched compute, the selection of ablations, verdicts, compute-to-FID and the
report (unit), and a smoke ablation end to end through Prefect, Ray Train and MLflow (e2e)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rae_core import ablations
from rae_core.ablations import compute, hart, latents, plots, report
from rae_core.ablations.plan import SCALES
from rae_core.config import from_dict
from rae_core.errors import ConfigError
from rae_core.presets import load_config

ROOT = Path(__file__).resolve().parents[1]
LETTERS = list(ablations.TITLES)
BUDGETED = ("no-shift", "plain-decoder", "dit", "pixels", "wide-dh", "wide-dit")


def _verdict_rows(md: str) -> list[str]:
    """The verdict table's rows: they start with the ablation's letter."""
    return [ln for ln in md.splitlines() if len(ln) > 4 and ln[:2] == "| " and
            ln[2] in LETTERS and ln[3:5] == " |"]


@pytest.fixture(scope="module")
def plan():
    return ablations.make_plan(load_config(None, "smoke"))


@pytest.mark.parametrize("preset", ["smoke", "tiny"])
def test_arms_of_an_ablation_get_equal_training_compute(preset):
    plan = ablations.make_plan(load_config(None, preset))
    arms = {a.name: a for a in plan.arms}
    ref = arms["reference"].train_flops
    for name in BUDGETED:
        assert arms[name].train_flops == pytest.approx(ref, rel=0.03), name
    # (f) has a budget of its own: the reference's DiT-DH for fewer steps
    f_budget = arms["rae-flow"].train_flops
    assert arms["rae-flow"].model == arms["reference"].model and f_budget < ref
    for name in ("vae-flow", "vae-ddpm"):
        assert arms[name].train_flops == pytest.approx(f_budget, rel=0.03), name
    assert arms["dit"].model != arms["reference"].model  # (d) compares two architectures
    widths = [a for a in plan.arms if a.overfit]
    assert len(widths) == 3
    for a in widths:
        assert a.train_flops == pytest.approx(widths[-1].train_flops, rel=0.03), a.name
    # narrower models are cheaper per step, so equal compute gives them more steps
    assert widths[0].steps > widths[1].steps > widths[2].steps
    assert len(plan.seeds) == SCALES[preset].seeds


@pytest.mark.parametrize("preset", ["smoke", "tiny"])
def test_the_two_regimes_of_d_put_the_latent_below_and_above_the_plain_dit_width(preset):
    from rae_core.autoencoder import latent_shape
    from rae_core.models import get_config

    plan = ablations.make_plan(load_config(None, preset))
    cfgs = {a.name: from_dict(a.config(plan.base, 0)) for a in plan.arms}

    def model(name):
        g = cfgs[name].generator
        return get_config(g.model, **g.overrides()), latent_shape(cfgs[name])[0]

    (dit, narrow), (wide_dit, wide) = model("dit"), model("wide-dit")
    (ref, _), (wide_dh, _) = model("reference"), model("wide-dh")
    assert (narrow, wide) == (64, 256)
    assert dit.width >= 3 * narrow  # narrow: a plain DiT already far wider than the latent
    # wide: the plain DiT must be as wide as the latent in every block (the width rule), DiT-DH
    # only in its shallow head; the body is the reference's, narrower than the latent
    assert wide_dit.hidden == wide and wide_dh.head_hidden >= wide > wide_dh.hidden
    assert (wide_dh.hidden, wide_dh.depth) == (ref.hidden, ref.depth)
    assert wide_dh.head_depth < wide_dit.depth
    assert plan.arm("wide-dh").train_flops == pytest.approx(plan.arm("wide-dit").train_flops,
                                                            rel=0.03)


def test_matching_picks_the_closest_depth_and_the_steps_of_equal_flops():
    from rae_core.models import model_flops_per_image

    target = model_flops_per_image("DiTDH-tiny", 64, 4)
    depth = compute.matched_depth("DiT-tiny", 64, 4, target, hidden=192)
    costs = {d: model_flops_per_image("DiT-tiny", 64, 4, hidden=192, depth=d) for d in (1, 2, 3)}
    assert depth == 2 and costs[1] < target < costs[3]
    steps = compute.matched_steps(compute.train_flops(target, 128, 600), costs[depth], 128)
    assert compute.train_flops(costs[depth], 128, steps) == pytest.approx(
        compute.train_flops(target, 128, 600), rel=0.01)


def test_every_arm_config_is_valid_and_differs_only_where_it_should(plan):
    cfgs = {a.name: from_dict(a.config(plan.base, 3)) for a in plan.arms}
    ref = cfgs["reference"]
    assert ref.seed == ref.sample.seed == 3 and ref.generator.shift is None
    assert cfgs["no-shift"].generator.shift == 1.0
    assert cfgs["plain-decoder"].decoder.noise_tau == 0.0 and ref.decoder.noise_tau == 0.8
    assert cfgs["pixels"].encoder.name == "pixels"
    assert cfgs["dit"].generator.model == cfgs["pixels"].generator.model == "DiT-micro"
    assert cfgs["width-32"].generator.hidden == 32
    # (f): the reference's DiT-DH and recipe on RAE and VAE latents, and DiT's recipe beside
    rae, flow, ddpm = cfgs["rae-flow"], cfgs["vae-flow"], cfgs["vae-ddpm"]
    assert (rae.generator.model, rae.generator.shift, rae.decoder.noise_tau) == \
        (ref.generator.model, None, 0.8)
    assert rae.encoder == ref.encoder and rae.autoencoder == ref.autoencoder
    assert flow.autoencoder == ddpm.autoencoder and flow.encoder == ddpm.encoder
    assert flow.autoencoder.kind == "vae" and flow.encoder.name == "vae-micro"
    assert (flow.generator.kind, flow.generator.model, flow.generator.patch) == \
        ("flow", ref.generator.model, 2)
    assert (flow.sample.sampler, flow.sample.steps) == (rae.sample.sampler, rae.sample.steps)
    assert (ddpm.generator.kind, ddpm.generator.model, ddpm.sample.sampler) == \
        ("ddpm", "DiT-micro/2", "ddpm")
    # the arms of f and HART's own arm score their EMA checkpoints; the others do not
    curves = {n for n, c in cfgs.items() if c.evaluate.curve_per_class > 0}
    assert curves == {"rae-flow", "vae-flow", "vae-ddpm", "hart"}
    for name in curves:
        g = cfgs[name].generator
        assert -(-g.steps // g.ckpt_every) == latents.SIZES["smoke"].checkpoints, name
        assert cfgs[name].sample.num_per_class == latents.SIZES["smoke"].num_per_class
    # the arms of f and of d's wide latent scale their EMA to their steps: the random
    # initialisation keeps the share of the final weights it has in the preset (a-e's arms
    # keep the preset's decay)
    preset = load_config(None, "smoke").generator
    assert ref.generator.ema == preset.ema
    for name in ("rae-flow", "vae-flow", "vae-ddpm", "wide-dh", "wide-dit"):
        g = cfgs[name].generator
        assert g.ema ** g.steps == pytest.approx(preset.ema ** preset.steps), name
    hart_preset = load_config(None, "smoke-hart").generator
    g = cfgs["hart"].generator
    assert g.ema ** g.steps == pytest.approx(hart_preset.ema ** hart_preset.steps)
    # the knobs an ablation varies are pinned, whatever --set says
    other = ablations.make_plan(load_config(None, "smoke", ["generator.shift=2.0",
                                                            "decoder.noise_tau=0.3"]))
    for arm in other.arms:
        c = from_dict(arm.config(other.base, 0))
        assert c.generator.shift == cfgs[arm.name].generator.shift, arm.name
        if not arm.overfit and arm.root.name != "shared-vae":  # neither decodes with a ViT
            assert c.decoder.noise_tau == cfgs[arm.name].decoder.noise_tau, arm.name
    assert {c.tracking.experiment for c in cfgs.values()} == {"rae-ablation"}
    assert plan.arm("plain-decoder").stages == ("train-decoder", "sample", "evaluate")
    assert plan.arm("dit").stages == ("train-generator", "sample", "evaluate")
    assert plan.arm("vae-flow").stages == ("train-generator", "sample", "evaluate")
    assert plan.arm("rae-flow").stages == ("train-generator", "sample", "evaluate")
    assert plan.arm("wide-dit").stages == ("train-generator", "sample", "evaluate")
    assert plan.arm("width-64").stages == ()


@pytest.mark.parametrize("letters, arms, roots", [
    (("f",), {"rae-flow", "vae-flow", "vae-ddpm"},
     ["dataset", "shared", "shared-vae", "shared-rae"]),
    (("e",), {"reference", "dit", "pixels"}, ["dataset", "shared", "shared-pixels"]),
    (("c",), {"reference", "plain-decoder"}, ["dataset", "shared"]),
    (("a",), {"width-32", "width-64", "width-96"}, ["dataset", "shared"]),
    (("d", "f"), {"reference", "dit", "wide-dh", "wide-dit", "rae-flow", "vae-flow", "vae-ddpm"},
     ["dataset", "shared", "shared-wide", "shared-vae", "shared-rae"]),
    (("g",), {"rae-flow", "hart", "hart-tokens"},
     ["dataset", "shared", "shared-hart", "shared-rae"]),
    (("f", "g"), {"rae-flow", "vae-flow", "vae-ddpm", "hart", "hart-tokens"},
     ["dataset", "shared", "shared-vae", "shared-hart", "shared-rae"]),
])
def test_only_runs_the_arms_its_ablations_compare_and_those_they_reuse(letters, arms, roots):
    plan = ablations.make_plan(load_config(None, "smoke"), letters)
    assert {a.name for a in plan.arms} == arms
    assert [r.name for r in plan.roots] == roots
    assert {c.ablation for c in plan.claims} == set(letters) == set(plan.titles)
    if letters == ("e",):  # the reference serves (e) only as the source of dit's decoder
        assert plan.served == {"reference": "e", "dit": "e", "pixels": "e"}
    assert [plan.root_serves(r) for r in plan.roots][0] == "".join(letters)
    everything = ablations.make_plan(load_config(None, "smoke"))
    assert everything.served["reference"] == "bcde" and everything.letters == tuple(LETTERS)
    assert everything.served["rae-flow"] == "fg"  # one arm for both, trained once
    assert [a.name for a in everything.arms].count("rae-flow") == 1


def test_only_rejects_an_unknown_letter_in_one_line(tmp_path):
    assert ablations.parse_only("f, d") == ("d", "f")
    with pytest.raises(ConfigError, match=r"unknown ablation 'x' \(valid: a, b, c, d, e, f, g\)"):
        ablations.parse_only("d,x")
    res = subprocess.run([sys.executable, "-m", "flows.cli", "ablate", "--preset", "smoke",
                          "--only", "d,x"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "rae: error: --only d,x: unknown ablation 'x' (valid: a, b, c, d, e, f, g)"]


def test_a_preset_without_ablation_sizes_is_refused():
    with pytest.raises(ConfigError, match="no ablation sizes"):
        ablations.make_plan(load_config(None, "imagenet256"))


@pytest.mark.parametrize("winner, loser, better, expected", [
    ({0: 1.0, 1: 2.0}, {0: 3.0, 1: 4.0}, "lower", report.HOLDS),
    ({0: 5.0, 1: 6.0}, {0: 3.0, 1: 4.0}, "lower", report.DOES_NOT_HOLD),
    ({0: 0.9}, {0: 0.5}, "higher", report.HOLDS),
    ({0: 0.4}, {0: 0.5}, "higher", report.DOES_NOT_HOLD),
    ({0: 0.5}, {0: 0.5}, "higher", report.DOES_NOT_HOLD),  # a tie is no improvement
    ({0: 1.0, 1: 9.0, 2: 1.0}, {0: 5.0, 1: 8.0, 2: 5.0}, "lower", report.MIXED),
])
def test_verdict_compares_the_arms_seed_by_seed(winner, loser, better, expected):
    assert report.verdict(winner, loser, better) == expected


def test_flops_to_reach_a_fid_interpolates_between_checkpoints():
    curve = [(3e9, 20.0), (1e9, 50.0), (4e9, 10.0), (2e9, 30.0)]  # any order
    assert compute.flops_to_reach(curve, 25.0) == pytest.approx(2.5e9)
    assert compute.flops_to_reach(curve, 10.0) == pytest.approx(4e9)
    assert compute.flops_to_reach(curve, 60.0) == pytest.approx(1e9)  # already at the first
    assert compute.flops_to_reach(curve, 5.0) is None  # not reached
    # the first crossing counts, even when the curve comes back up
    assert compute.flops_to_reach([(1.0, 50.0), (2.0, 20.0), (3.0, 40.0)], 30.0) == \
        pytest.approx(1.0 + 20.0 / 30.0)


# FID at the EMA checkpoints of (f)'s arms and HART's, seed 0; other seeds add the seed
CURVES = {"rae-flow": [30.0, 15.0, 10.0], "vae-flow": [40.0, 30.0, 16.0],
          "vae-ddpm": [50.0, 40.0, 35.0], "hart": [45.0, 25.0, 12.0]}


def _fake_results(plan, flip: str | None = None):
    """Numbers for every arm and seed; the paper's direction everywhere except ablation `flip`."""
    results = {}
    for i, arm in enumerate(plan.arms):
        results[arm.name] = {}
        for s in plan.seeds:
            run = f"run-{arm.name}-{s}"
            good = arm.name in ("reference", "dit", "wide-dh", "rae-flow", "hart") or \
                arm.name.startswith("width-") and arm.name != "width-32"
            fid = (10.0 if good else 20.0) + s + 0.1 * i
            if flip == "b" and arm.name == "no-shift":
                fid = 1.0
            rae_decoder = arm.root.name != "shared-vae" and arm.name != "plain-decoder"
            results[arm.name][s] = {
                "steps": {"value": float(arm.steps), "run_id": run},
                "train_flops": {"value": arm.train_flops, "run_id": run},
                "fid": {"value": fid, "run_id": run + "-ev"},
                "class_accuracy": {"value": (0.5 if good else 0.4) - 0.01 * i,
                                   "run_id": run + "-ev"},
                "rfid": {"value": 3.0 if rae_decoder else (2.0 if arm.name ==
                                                           "plain-decoder" else 5.0),
                         "run_id": run},
                "recon_psnr": {"value": 20.0 if arm.name == "plain-decoder" else 19.0,
                               "run_id": run},
                "overfit_loss": {"value": 0.5 if arm.name == "width-32" else 0.01,
                                 "run_id": run},
                "rfid_discrete": {"value": 4.0, "run_id": run},
                "recon_psnr_discrete": {"value": 17.0, "run_id": run},
                "images_per_s": {"value": 300.0 if arm.root.name == "shared-hart" else 40.0,
                                 "run_id": run}}
            if arm.name in CURVES:
                every = arm.overrides["generator.ckpt_every"]
                steps = [min(every * (k + 1), arm.steps) for k in range(len(CURVES[arm.name]))]
                results[arm.name][s]["curve"] = [
                    {"step": st, "fid": report.number("curve_fid", f + s, run, st),
                     "train_flops": report.number(
                         "curve_train_flops", compute.train_flops(arm.flops_per_image,
                                                                  arm.batch, st), run, st)}
                    for st, f in zip(steps, CURVES[arm.name], strict=True)]
    return results


def test_report_has_a_row_per_claim_and_says_plainly_where_the_paper_does_not_hold(
        plan, tmp_path):
    rep = report.build_report(plan, _fake_results(plan, flip="b"), "parent", "domain:x", 123.0)
    md = report.render_markdown(rep)
    table = _verdict_rows(md)
    assert sorted({ln[2] for ln in table}) == LETTERS
    assert len(table) == len(plan.claims)
    verdicts = {(r["ablation"], r["case"], r["metric"]): r["verdict"] for r in rep["claims"]}
    assert verdicts["b", "", "fid"] == report.DOES_NOT_HOLD
    assert all(v == report.HOLDS for k, v in verdicts.items() if k != ("b", "", "fid"))
    assert "| does not hold |" in md
    # (d) in both regimes, each with its own verdict
    assert {r["case"] for r in rep["claims"] if r["ablation"] == "d"} == \
        {"64-channel latent", "256-channel latent"}
    assert any(ln.startswith("| d | DiT-DH vs DiT, equal FLOPs, 256-channel latent |")
               for ln in table)
    # both FLOP totals of (d) are reported, with the runs that logged them
    for name in ("reference", "dit", "wide-dh", "wide-dit"):
        assert rep["arms"][name]["train_flops"]["run_id"] == f"run-{name}-0"
    parent = {n["metric"] for n in report.parent_numbers(rep)}
    assert parent >= {"ablate.wall_s", "b.no-shift.fid.mean", "curve.vae-flow.fid.mean",
                      "f.rae-flow.compute_ratio", "f.rae.encoder_gmac"}
    json.dumps(rep)
    for letter in LETTERS:
        png = plots.plot_ablation(rep, letter, tmp_path / f"{letter}.png")
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert plots.curve_arms(rep, "f") == ["rae-flow", "vae-flow", "vae-ddpm"]
    assert plots.curve_arms(rep, "g") == ["hart", "rae-flow"]
    assert plots.curve_arms(rep, "d") == []
    png = plots.plot_curves(rep, "f", tmp_path / "f-curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_f_reports_the_compute_each_arm_needs_to_reach_the_vae_flow_arms_fid(plan):
    rep = report.build_report(plan, _fake_results(plan), "parent", "domain:x", 1.0)
    compute_table, autoencoders = [t for t in rep["tables"] if t["ablation"] == "f"]
    rows = {r[0]: r for r in compute_table["rows"]}
    flops = {a: [p["train_flops"]["value"] for p in rep["curves"][a]] for a in CURVES}
    # one seed: the mean curve is the curve; vae-flow's final FID 16 is the target
    assert rows["vae-flow"][2]["value"] == 16.0
    assert rows["vae-flow"][3]["value"] == pytest.approx(flops["vae-flow"][2])
    f0, f1 = flops["rae-flow"][:2]  # rae-flow: 30 -> 15 crosses 16 at 14/15 of the way
    assert rows["rae-flow"][3]["value"] == pytest.approx(f0 + 14 / 15 * (f1 - f0))
    assert rows["rae-flow"][4]["value"] == pytest.approx(
        flops["vae-flow"][2] / rows["rae-flow"][3]["value"])
    assert rows["vae-ddpm"][3] == "not reached"
    for r in compute_table["rows"]:
        for cell in r[2:]:
            assert isinstance(cell, str) or cell["run_id"] == "parent"
    md = report.render_markdown(rep)
    assert "## (f) training compute to reach the VAE flow arm's final FID" in md
    assert "| not reached |" in md
    rae_row, vae_row = autoencoders["rows"]
    assert rae_row[2]["mean"]["value"] == 3.0 and vae_row[2]["mean"]["value"] == 5.0
    assert rae_row[0].startswith("RAE: mae-micro") and vae_row[0].startswith("VAE: vae-micro")
    assert rae_row[1] == "64x4x4" and vae_row[1] == "4x8x8"
    for row in (rae_row, vae_row):
        assert row[4]["value"] > 0 and row[5]["value"] > 0  # encoder and decoder GMAC
    assert "135 / 310" in vae_row[6] and "22 / 106" in rae_row[6]


@pytest.mark.parametrize("preset", ["smoke", "tiny"])
def test_g_matches_hart_to_the_rae_arms_training_flops_and_reuses_its_generator(preset):
    plan = ablations.make_plan(load_config(None, preset), ("g",))
    family = load_config(None, hart.HART_PRESETS[preset])
    rae, arm, tokens = (plan.arm(n) for n in ("rae-flow", "hart", "hart-tokens"))
    assert rae == next(a for a in latents.design(load_config(None, preset))[0]
                       if a.name == "rae-flow")  # (f)'s arm, at (f)'s budget
    # the arithmetic of the match: steps = budget / (3 x FLOPs per image x batch)
    per_image = compute.scalewise_flops_per_image(family)
    assert arm.flops_per_image == per_image and arm.batch == family.generator.batch_size
    assert arm.steps == round(rae.train_flops / (3 * per_image * arm.batch))
    assert arm.train_flops == pytest.approx(rae.train_flops, rel=0.01)
    # the residual-free arm only re-samples hart's generator, trained once
    assert tokens.generator_from == "hart" and tokens.stages == ("sample", "evaluate")
    assert (tokens.steps, tokens.flops_per_image, tokens.model) == \
        (arm.steps, arm.flops_per_image, arm.model)
    assert arm.stages == ("train-generator", "sample", "evaluate")
    cfgs = {a.name: from_dict(a.config(plan.base, 1)) for a in plan.arms}
    h, t = cfgs["hart"], cfgs["hart-tokens"]
    assert (h.sample.residual, t.sample.residual) == (True, False)
    assert h.generator == t.generator and h.autoencoder == t.autoencoder
    assert (h.autoencoder.kind, h.encoder.name, h.generator.kind, h.generator.model) == \
        ("hybrid-vq", family.encoder.name, "hart", family.generator.model)
    assert h.encoder == family.encoder and h.decoder == family.decoder
    assert (h.sample.sampler, h.sample.steps, h.sample.scale) == \
        (family.sample.sampler, family.sample.steps, family.sample.scale)
    assert h.generator.steps == arm.steps and h.sample.seed == t.sample.seed == 1
    size = latents.SIZES[preset]
    assert h.sample.num_per_class == cfgs["rae-flow"].sample.num_per_class == size.num_per_class
    assert h.evaluate.curve_per_class == size.curve_per_class and t.evaluate.curve_per_class == 0
    assert [(c.metric, c.winner, c.loser, c.loser_key) for c in plan.claims] == [
        ("rfid", "hart", "hart-tokens", "rfid_discrete"),
        ("recon_psnr", "hart", "hart-tokens", "recon_psnr_discrete"),
        ("fid", "hart", "hart-tokens", "fid"),
        ("class_accuracy", "hart", "hart-tokens", "class_accuracy"),
        ("images_per_s", "hart", "rae-flow", "images_per_s")]


@pytest.mark.parametrize("preset", ["smoke-hart", "tiny-hart"])
def test_hart_flops_per_image_are_a_third_of_a_counted_training_step(preset):
    """3 x the counted forward against FlopCounterMode over a real forward and backward of the
    training loss: the 3x over-counts the frozen quantiser and the first layer's input
    gradient, by at most 15 %."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from rae_core.autoencoder import tokenizer_config
    from rae_core.generator import build_generator
    from rae_core.quantize import MultiScaleQuantizer

    cfg = load_config(None, preset)
    per_image = compute.scalewise_flops_per_image(cfg)
    t = tokenizer_config(cfg)
    side, batch = t.resolution // t.downsampling, 4
    quantizer = MultiScaleQuantizer(t.vocab, t.z_channels, t.scales, t.beta)
    net = build_generator(cfg, (t.z_channels, side, side), (quantizer, 1.0))
    torch.manual_seed(1)
    f = torch.randn(batch, t.z_channels, side, side)
    y = torch.randint(0, cfg.data.num_classes, (batch,))
    lo, hi = cfg.generator.mask_ratio
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(f, y, mask_ratio=((lo + hi) / 2,) * 2)["total"].backward()
    step = counter.get_total_flops()
    estimate = compute.train_flops(per_image, batch, 1)
    assert step <= estimate <= 1.15 * step


def test_g_reports_quality_against_speed_and_the_tokens_alone(tmp_path):
    sub = ablations.make_plan(load_config(None, "smoke"), ("g",))
    rep = report.build_report(sub, _fake_results(sub), "parent", "domain:x", 1.0)
    assert {r["verdict"] for r in rep["claims"]} == {report.HOLDS}
    rfid = next(r for r in rep["claims"] if r["metric"] == "rfid")
    assert (rfid["winner"]["mean"]["value"], rfid["loser"]["mean"]["value"]) == (3.0, 4.0)
    assert rfid["loser"]["mean"]["metric"] == "g.hart-tokens.rfid_discrete.mean"
    (table,) = rep["tables"]
    rows = {r[0]: r for r in table["rows"]}
    assert list(rows) == ["rae-flow", "hart", "hart-tokens"]
    assert rows["hart"][6]["mean"]["value"] == 300.0 and rows["rae-flow"][6]["mean"]["value"] == 40
    assert rows["hart"][7] == report.number("g.hart.speedup", 7.5, "parent")
    assert rows["rae-flow"][7] is None
    assert rows["hart"][3]["value"] == pytest.approx(rows["rae-flow"][3]["value"], rel=0.01)
    md = report.render_markdown(rep)
    assert "hart-tokens (rFID of the discrete tokens alone): **4**" in md
    assert "## (g) quality against sampling speed at equal training FLOPs" in md
    assert "1.5 s per batch of 64" in md and "euler in 10 steps, CFG 5" in md
    assert plots.plot_ablation(rep, "g", tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert plots.curve_arms(rep, "g") == ["hart", "rae-flow"]


def test_a_report_of_some_ablations_covers_only_those(plan):
    sub = ablations.make_plan(load_config(None, "smoke"), ("c", "f"))
    rep = report.build_report(sub, _fake_results(sub), "parent", "domain:x", 1.0)
    md = report.render_markdown(rep)
    assert {ln[2] for ln in _verdict_rows(md)} == {"c", "f"}
    assert set(rep["arms"]) == {"reference", "plain-decoder", "rae-flow", "vae-flow",
                                "vae-ddpm"}
    assert rep["arms"]["reference"]["ablations"] == "c"
    assert md.startswith("# RAE ablations, preset `smoke`\n\nAblations c, f;")


# ---------------------------------------------------------------------------------------------


def _numbers(node, path=""):
    """Every number in report.json: (path, {metric, value, run_id}) or a bare number."""
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


# g (HART) has its own unit tests and smoke run (docs/benchmarks.md); here it would add minutes
E2E_LETTERS = ["d", "f"]


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
    for cmd in (["params", "--preset", "smoke"],
                ["ablate", "--preset", "smoke", "--only", ",".join(E2E_LETTERS)]):
        res = subprocess.run([sys.executable, "-m", "flows.cli", *cmd], cwd=proj, env=env,
                             capture_output=True, text=True, timeout=1200)
        assert res.returncode == 0, f"{cmd}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"

    out = proj / "runs" / "ablate" / "smoke"
    md = (out / "report.md").read_text()
    assert sorted({ln[2] for ln in _verdict_rows(md)}) == E2E_LETTERS
    assert all((out / "plots" / f"{x}.png").exists() for x in E2E_LETTERS)
    assert (out / "plots" / "f-curve.png").exists()
    report_ = json.loads((out / "report.json").read_text())
    assert {r["ablation"] for r in report_["claims"]} == set(E2E_LETTERS)
    # row (f): the final FIDs of the three arms, and the compute and autoencoder tables
    f_rows = {(r["winner"]["arm"], r["loser"]["arm"], r["metric"])
              for r in report_["claims"] if r["ablation"] == "f"}
    assert f_rows == {("rae-flow", "vae-flow", "fid"), ("rae-flow", "vae-ddpm", "fid"),
                      ("rae-flow", "vae-flow", "class_accuracy"),
                      ("rae-flow", "vae-ddpm", "class_accuracy"),
                      ("rae-flow", "vae-flow", "rfid")}
    assert "| f | RAE latents vs VAE latents, equal FLOPs, DiT's recipe: DiT/2 and DDPM |" in md
    assert {t["title"] for t in report_["tables"]} == {
        "training compute to reach the VAE flow arm's final FID",
        "the autoencoders side by side"}
    assert set(report_["curves"]) == {"rae-flow", "vae-flow", "vae-ddpm"}
    for arm, points in report_["curves"].items():
        assert len(points) == latents.SIZES["smoke"].checkpoints, arm

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    numbers = list(_numbers(report_))
    bare = [p for p, n in numbers if n is None and not p.startswith(".seeds")
            and not p.endswith((".seed", ".step"))]
    assert not bare, f"numbers without a run: {bare}"
    runs = {}
    for path, n in numbers:
        if n is None:
            continue
        run = runs.get(n["run_id"]) or client.get_run(n["run_id"])
        runs[n["run_id"]] = run
        assert run.info.status == "FINISHED", path
        if "step" in n:
            history = {m.step: m.value for m in client.get_metric_history(n["run_id"],
                                                                          n["metric"])}
            assert history[n["step"]] == n["value"], path
        else:
            assert run.data.metrics[n["metric"]] == n["value"], path

    parent = client.get_run(report_["parent_run_id"])
    assert parent.data.tags["rae.kind"] == "ablation"
    assert parent.data.tags["mlflow.runName"] == "ablate-smoke"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.json", "plots"} <= arts
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    arms = {(r.data.tags["rae.arm"], r.data.tags.get("rae.seed")) for r in children}
    assert {(a, "0") for a in report_["arms"]} <= arms
    assert {a for a, seed in arms if seed is None} == {"dataset", "shared", "shared-wide",
                                                       "shared-vae", "shared-rae"}
    for r in children:
        assert r.data.tags["rae.ablation"] and r.info.status == "FINISHED"
    # ablation models stay out of the model registry (and away from its champion alias)
    assert client.search_registered_models() == []

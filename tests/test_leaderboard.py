"""The champion alias: the best registered version under the most thorough evaluation
protocol, never taken by a small evaluation from a better model measured on more samples."""

from flows import tracking
from flows.leaderboard import crown_champion, rows
from rae_core.presets import load_config

NAME = "rae-generator-digits-32"


def _evaluation(root, version, num_samples, fid, family="rae/flow", extractor="domain"):
    cfg = load_config(None, "smoke")
    run = tracking.start_run(cfg, root, "evaluate", tags={
        "rae.kind": tracking.EVAL_KIND, "rae.family": family, "rae.dataset": "digits",
        "rae.resolution": "32", "rae.extractor": extractor, "rae.num_samples": str(num_samples),
        "rae.generator_version": str(version)})
    tracking.log_numbers(run, {"fid": fid})
    tracking.end_run(run)
    return run


def _versions(n):
    c = tracking.client()
    c.create_registered_model(NAME)
    owner = tracking.start_run(load_config(None, "smoke"), ".", "train-generator")
    for _ in range(n):
        c.create_model_version(NAME, source=f"runs:/{owner}/model", run_id=owner)


def champion():
    return str(tracking.client().get_model_version_by_alias(NAME, "champion").version)


def test_a_small_evaluation_does_not_take_the_alias_from_a_better_measured_model(local_mlflow,
                                                                                tmp_path):
    _versions(3)
    _evaluation(tmp_path, 1, 500, 5.0)
    _evaluation(tmp_path, 2, 500, 4.0)
    assert crown_champion("rae", NAME, "digits", "32", "rae/flow") == "2"
    _evaluation(tmp_path, 3, 50, 2.0)  # a lower FID, on a tenth of the samples
    assert crown_champion("rae", NAME, "digits", "32", "rae/flow") == "2"
    assert champion() == "2"
    _evaluation(tmp_path, 3, 500, 3.0)  # the same model measured as thoroughly: it wins
    assert crown_champion("rae", NAME, "digits", "32", "rae/flow") == "3"
    assert champion() == "3"
    # another family's evaluations never decide this family's champion
    _evaluation(tmp_path, 1, 5000, 0.5, family="vae/ddpm")
    assert crown_champion("rae", NAME, "digits", "32", "rae/flow") == "3"
    assert {r["num_samples"] for r in rows("rae")} == {"50", "500", "5000"}


def test_no_scored_version_leaves_the_alias_alone(local_mlflow, tmp_path):
    _evaluation(tmp_path, "", 500, 5.0)  # an evaluation of no registered version
    assert crown_champion("rae", NAME, "digits", "32", "rae/flow") is None

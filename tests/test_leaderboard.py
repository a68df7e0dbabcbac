"""The champion alias: the best registered version under the most thorough evaluation
protocol, never taken by a small evaluation from a better model measured on more samples; the
leaderboard's table, ranked by FID within each group of comparable evaluations."""

import json

from flows import tracking
from flows.leaderboard import crown_champion, render, rows
from rae_core.presets import load_config

NAME = "rae-generator-digits-32"


def _evaluation(root, version, num_samples, fid, family="rae/flow", extractor="domain",
                reference="train split"):
    cfg = load_config(None, "smoke")
    run = tracking.start_run(cfg, root, "evaluate", tags={
        "rae.kind": tracking.EVAL_KIND, "rae.family": family, "rae.dataset": "digits",
        "rae.resolution": "32", "rae.extractor": extractor, "rae.reference": reference,
        "rae.num_samples": str(num_samples), "rae.generator_version": str(version)})
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


def _table_rows(text: str) -> list[list[str]]:
    """The cells of a rich table's rows (header first), without the box drawing."""
    return [[c.strip() for c in line.strip("│┃").split("│" if "│" in line else "┃")]
            for line in text.splitlines() if line.startswith(("│", "┃"))]


def test_the_table_ranks_each_group_by_fid_with_its_columns_and_values(local_mlflow, tmp_path):
    _evaluation(tmp_path, 1, 500, 5.0)
    _evaluation(tmp_path, 2, 500, 2.5, family="vae/ddpm")
    _evaluation(tmp_path, 3, 500, 9.125)
    _evaluation(tmp_path, 4, 50, 1.0)  # fewer samples: a group of its own
    board = rows("rae")
    text = render(board, 10, "table")
    groups = [line for line in text.splitlines() if line.startswith("dataset=")]
    assert groups == [
        "dataset=digits / resolution=32 / extractor=domain / reference=train split / "
        "num_samples=50",
        "dataset=digits / resolution=32 / extractor=domain / reference=train split / "
        "num_samples=500"]
    small, large = text.split(groups[1])
    header, *ranked = _table_rows(large)
    assert header == ["rank", "fid", "precision", "recall", "class_accuracy", "images_per_s",
                      "family", "model", "encoder", "steps", "sampler", "sampling_steps",
                      "guidance", "scale", "preset", "protocol", "run_id"]
    cell = {name: i for i, name in enumerate(header)}
    assert [(r[cell["rank"]], r[cell["fid"]], r[cell["family"]]) for r in ranked] == [
        ("1", "2.5", "vae/ddpm"), ("2", "5", "rae/flow"), ("3", "9.125", "rae/flow")]
    assert [r[cell["run_id"]] for r in ranked] == [
        r["run_id"][:12] for r in board if r["num_samples"] == "500"]
    assert [r[cell["fid"]] for r in _table_rows(small)[1:]] == ["1"]
    # --top keeps the best of each group; json and md keep their formats
    assert len(_table_rows(render(board, 1, "table").split(groups[1])[1])) == 2
    as_json = json.loads(render(board, 10, "json"))
    assert [r["fid"] for r in as_json[groups[1]]] == [2.5, 5.0, 9.125]
    md = render(board, 10, "md").splitlines()
    assert md[0] == f"### {groups[0]}" and md[2].startswith("| rank | fid | precision |")
    assert md[3] == "|" + "---|" * 17
    assert {r[cell["protocol"]] for r in ranked} == {"domain / train split / 500"}


def test_without_evaluations_the_table_says_how_to_get_one():
    assert render([], 10, "table") == "no evaluations yet: run `rae run` (or `make demo`) first"


def test_runs_of_different_reference_sets_are_never_ranked_together(local_mlflow, tmp_path):
    """The same extractor and sample count against the training split and against ADM's batch
    are two protocols: two groups, and the champion is the best under one protocol only."""
    _versions(2)
    adm = "adm:VIRTUAL_imagenet256_labeled.npz"
    _evaluation(tmp_path, 1, 500, 3.0, extractor="inception")
    _evaluation(tmp_path, 2, 500, 1.0, extractor="inception", reference=adm)
    board = rows("rae")
    assert len({r["group"] for r in board}) == 2
    assert {r["protocol"] for r in board} == {"inception / train split / 500",
                                              f"inception / {adm} / 500"}
    text = render(board, 10, "table")
    tables = [_table_rows(part)[1:] for part in text.split("dataset=")[1:]]
    assert [[r[0] for r in t] for t in tables] == [["1"], ["1"]]  # each first in its own table
    crowned = crown_champion("rae", NAME, "digits", "32", "rae/flow")
    protocol = next(r["group"] for r in board if r["generator_version"] == crowned)
    assert all(r["fid"] >= next(b["fid"] for b in board if b["generator_version"] == crowned)
               for r in board if r["group"] == protocol)

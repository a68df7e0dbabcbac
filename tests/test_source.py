"""Where a run's code came from: git provenance on every MLflow run, the experiment opened in
the model-training view, and flow runs named after preset and revision."""


import pytest
from conftest import git

from flows.source import code_revision, flow_run_name, git_source, source_tags


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "exp/branch")
    (repo / "params.yaml").write_text("preset: smoke\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "x")
    git(repo, "remote", "add", "origin", "https://example.com/rae.git")
    git_source.cache_clear()
    yield repo
    git_source.cache_clear()


def test_the_git_state_of_the_project_is_read_as_it_is(repo):
    commit = git(repo, "rev-parse", "HEAD")
    tags = source_tags(repo)
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["mlflow.source.git.branch"] == "exp/branch"
    assert tags["mlflow.source.git.repoURL"] == "https://example.com/rae.git"
    assert tags["rae.git.dirty"] == "false"
    (repo / "params.yaml").write_text("preset: tiny\n")  # a tracked change
    git_source.cache_clear()
    assert source_tags(repo)["rae.git.dirty"] == "true"
    assert code_revision(repo / "runs" / "not-made-yet") == commit + "+dirty"


def test_outside_git_nothing_is_claimed(tmp_path):
    git_source.cache_clear()
    assert code_revision(tmp_path) == "unversioned"
    assert "mlflow.source.git.commit" not in source_tags(tmp_path)


def test_every_run_carries_its_source_and_the_experiment_opens_on_training(repo, local_mlflow):
    from flows import tracking
    from rae_core.presets import load_config

    cfg = load_config(None, "smoke")
    run_id = tracking.start_run(cfg, repo, "stage-x")
    run = tracking.client().get_run(run_id)
    assert run.data.tags["mlflow.source.git.commit"] == git(repo, "rev-parse", "HEAD")
    assert run.data.tags["mlflow.source.type"] == "PROJECT"
    exp = local_mlflow.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made before (or elsewhere) is given the tag the next time it is used
    other = local_mlflow.create_experiment("older")
    tracking.start_run(load_config(None, "smoke", ["tracking.experiment=older"]), repo, "y")
    assert local_mlflow.get_experiment(other).tags["mlflow.experimentKind"] == \
        "custom_model_development"


def test_flow_runs_are_named_after_what_ran_and_the_revision(repo, monkeypatch):
    from prefect.runtime import flow_run

    short = git(repo, "rev-parse", "HEAD")[:12]
    cases = [({"cfg_dict": {"preset": "tiny"}, "root": str(repo)}, f"tiny@{short}"),
             ({"name": "train-generator", "cfg_dict": {"preset": "smoke"}, "root": str(repo)},
              f"train-generator smoke@{short}"),
             ({"preset": "smoke", "root": str(repo / "runs" / "reproduce")}, f"smoke@{short}"),
             ({"cfg_dict": {"preset": "tiny"}, "project": str(repo)}, f"tiny@{short}")]
    for params, name in cases:
        monkeypatch.setattr(flow_run, "parameters", params)
        assert flow_run_name() == name

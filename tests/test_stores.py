"""The empty migrated databases a new project starts from (flows/stores.py)."""

from __future__ import annotations

import sqlite3

import pytest

from flows import stores


@pytest.mark.parametrize("kind", stores.KINDS)
def test_the_install_made_a_template_for_the_installed_version(kind):
    path = stores.template(kind)
    assert path.is_file(), f"{path}: run `make install` (python -m flows.stores)"
    tables = {r[0] for r in sqlite3.connect(path).execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "alembic_version" in tables and len(tables) > 10


def test_a_seeded_mlflow_store_is_current_and_its_default_experiment_is_the_projects(
        tmp_path, monkeypatch):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    assert stores.seed("mlflow", db)
    # the store refuses a database whose schema is behind the installed MLflow
    store = SqlAlchemyStore(f"sqlite:///{db}", str(tmp_path / "mlruns"))
    default = store.get_experiment("0")
    assert default.artifact_location == str(tmp_path / "mlruns" / "0")
    assert store.create_experiment("rae") == "1"
    assert [e.name for e in store.search_experiments()] == ["rae", "Default"]
    store.engine.dispose()


def test_seeding_never_replaces_a_database_and_needs_a_template(tmp_path, monkeypatch):
    db = tmp_path / "home" / "prefect.db"
    db.parent.mkdir()
    db.write_bytes(b"the project's own")
    assert not stores.seed("prefect", db)
    assert db.read_bytes() == b"the project's own"

    fresh = tmp_path / "fresh" / "prefect.db"
    assert stores.seed("prefect", fresh)
    assert sqlite3.connect(fresh).execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    assert list(fresh.parent.glob(".*.tmp")) == []

    monkeypatch.setattr(stores, "template", lambda kind: tmp_path / "none.db")
    assert not stores.seed("prefect", tmp_path / "other" / "prefect.db")
    assert not (tmp_path / "other" / "prefect.db").exists()

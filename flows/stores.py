"""Empty, migrated databases for Prefect and MLflow, made once per installed version of each.

A new project's first `rae run` would otherwise build both SQLite schemas from scratch: Prefect's
server migrates a new prefect.db for ~8 s of its ~11 s boot on 2 cores, MLflow a new mlflow.db
for ~3 s. The schemas depend only on the installed versions, so `make install` migrates one
empty database of each into the environment (`python -m flows.stores`), and a project that has
none yet starts from a copy.

    python -m flows.stores    make the templates for the installed versions (idempotent)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

log = logging.getLogger(__name__)
KINDS = ("prefect", "mlflow")


def template(kind: str) -> Path:
    """Where the empty database of `kind` for its installed version lives."""
    return Path(sys.prefix) / "share" / "rae" / f"{kind}-{version(kind)}.db"


def seed(kind: str, dest: Path) -> bool:
    """Copy the template of `kind` to `dest` when `dest` does not exist yet; False when there is
    no template (the service then migrates a new database itself, as it would anyway)."""
    src = template(kind)
    if dest.exists() or not src.exists():
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    _copy(src, tmp)
    if kind == "mlflow":
        _own_default_experiment(tmp)
    try:
        os.link(tmp, dest)  # never over a database another process has just created
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


def _copy(src: Path, dest: Path) -> None:
    """A consistent copy through SQLite itself, whatever journal mode the source was left in."""
    with contextlib.closing(sqlite3.connect(src)) as a, contextlib.closing(sqlite3.connect(dest)) as b:
        a.backup(b)


def _own_default_experiment(db: Path) -> None:
    """MLflow's Default experiment (id 0) as MLflow would have made it here and now: artifacts
    under ./mlruns of the working directory, created at this moment."""
    now = int(time.time() * 1000)
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                    "last_update_time = ? WHERE experiment_id = 0",
                    (str(Path.cwd() / "mlruns" / "0"), now, now))


def build() -> list[Path]:
    """Make the missing templates; returns those made."""
    made = []
    for kind in KINDS:
        path = template(kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two installs at once make it once
            if path.exists():
                continue
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                db, whole = Path(tmp) / "empty.db", Path(tmp) / "template.db"
                _MIGRATE[kind](db)
                _copy(db, whole)  # one file, whatever journal the migration left beside it
                os.replace(whole, path)
            made.append(path)
    return made


def _migrate_prefect(db: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(db.parent), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{db}")
    subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database",
                    "upgrade", "-y"], env=env, check=True, capture_output=True)


def _migrate_mlflow(db: Path) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{db}", str(db.parent / "mlruns"))
    store.engine.dispose()


_MIGRATE = {"prefect": _migrate_prefect, "mlflow": _migrate_mlflow}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for p in build():
        log.info("made %s", p)

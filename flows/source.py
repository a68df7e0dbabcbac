"""Where a run's code came from: the git commit, branch and dirty flag of the project, for
MLflow's source tags, flow-run names and the reproducibility runs' configuration key."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class GitSource:
    commit: str  # the full hash of HEAD
    branch: str  # '' on a detached HEAD
    dirty: bool  # tracked files differ from the commit
    repo_url: str  # the `origin` remote, '' without one

    @property
    def revision(self) -> str:
        """The commit, with `+dirty` when the working tree differs from it."""
        return self.commit + ("+dirty" if self.dirty else "")

    @property
    def short(self) -> str:
        return self.commit[:12] + ("+dirty" if self.dirty else "")


@lru_cache(maxsize=16)
def git_source(root: Path) -> GitSource | None:
    """The git state of the checkout holding `root` (or its nearest existing parent), read once
    per command (the project's driver clears it before each one), or None outside git."""
    where = next(p for p in (root, *root.parents) if p.exists())  # a run folder may be new

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                             timeout=30)
        return res.stdout.strip() if res.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    return GitSource(commit, git("symbolic-ref", "--short", "-q", "HEAD"),
                     bool(git("status", "--porcelain", "--untracked-files=no")),
                     git("remote", "get-url", "origin"))


def code_revision(root: Path) -> str:
    """The git commit of the project, with `+dirty` when tracked files differ from it."""
    source = git_source(Path(root))
    return source.revision if source else "unversioned"


def source_tags(root: Path) -> dict[str, str]:
    """MLflow's standard source tags (the runs table's Source column) and the dirty flag."""
    source = git_source(Path(root))
    tags = {"mlflow.source.type": "PROJECT", "mlflow.source.name": "rae-platform"}
    if source:
        tags.update({"mlflow.source.git.commit": source.commit,
                     "mlflow.source.git.branch": source.branch,
                     "mlflow.source.git.repoURL": source.repo_url,
                     "rae.git.dirty": str(source.dirty).lower()})
    return {k: v for k, v in tags.items() if v}


def run_name(what: str, root: Path) -> str:
    """A flow run's name: what ran (a preset, a stage) at which revision."""
    source = git_source(Path(root))
    return f"{what}@{source.short if source else 'unversioned'}"


def flow_run_name() -> str:
    """The name of a flow run of the platform, from its parameters: the preset (or the stage
    and preset) and the code revision, e.g. `smoke@3f2a9c1d0b7e` or `train-generator
    tiny@3f2a9c1d0b7e+dirty`."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    preset = params.get("preset") or (params.get("cfg_dict") or {}).get("preset") or "params.yaml"
    what = f"{params['name']} {preset}" if "name" in params else preset
    return run_name(what, Path(params.get("root") or params.get("project") or "."))

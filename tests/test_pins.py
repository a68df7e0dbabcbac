"""Everything the platform installs is pinned in constraints.txt.

constraints.txt is the full `==` pin list that every install passes with `-c`: the Makefile's
dev install, the platform image and the Ray cluster nodes (the `cluster` extra), the MLflow
server image (the `mlflow-server` extra's packages, by name). These tests read the files only:
every `pip install` line under infra/ (and docs/scale.md, the Makefile) names only pinned
packages and carries `-c`, every requirement in pyproject.toml is pinned within its specifier,
and the requirements that the installed metadata declares (ray's `default` extra above all) are
pinned too. Offline; nothing is installed.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from conftest import constraint_pins
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
PROJECT = canonicalize_name("rae-platform")

# Where an install line's `-c` may point: the repository's file, or the copy the MLflow image
# makes of it (its build context holds constraints.txt alone).
CONSTRAINT_PATHS = {"constraints.txt"}
CONSTRAINT_PATHS_BY_FILE = {MLFLOW_DOCKERFILE: {"/tmp/constraints.txt"}}

# pip options that take a value (the value is not a package).
VALUE_OPTIONS = {
    "-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
    "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--upgrade-strategy",
    "--platform", "--python-version", "--implementation", "--abi", "--only-binary",
    "--no-binary", "--progress-bar", "--report", "--cache-dir", "--timeout", "--retries",
    "--src", "--config-settings", "-C", "--python",
}
# A line ends at a shell separator, a line continuation or the end of an inline code span.
LINE_END = re.compile(r"&&|\|\||;|\||`|\\\s*$|\)")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def project_requirements(extras) -> list[Requirement]:
    """The project's own dependencies plus those of the named extras (unknown extras fail)."""
    optional = project()["optional-dependencies"]
    reqs = [Requirement(r) for r in project()["dependencies"]]
    for extra in extras:
        assert extra in optional, f"pyproject.toml has no extra [{extra}]"
        reqs += [Requirement(r) for r in optional[extra]]
    return reqs


def pin_problem(req: Requirement, pinned: dict[str, str]) -> str | None:
    name = canonicalize_name(req.name)
    if name == PROJECT:
        return None
    if name not in pinned:
        return f"{req.name} is not pinned"
    if not req.specifier.contains(Version(pinned[name]), prereleases=True):
        return f"{req.name}=={pinned[name]} does not satisfy `{req}`"
    return None


@pytest.fixture(scope="module")
def pinned() -> dict[str, str]:
    return constraint_pins()


# the `pip install` lines ---------------------------------------------------------------------


class Install:
    def __init__(self, path: Path, lineno: int, text: str):
        self.where = f"{path.relative_to(ROOT)}:{lineno}: `pip install{text}`"
        self.path = path
        self.constraints: list[str] = []
        self.requirements: list[Requirement] = []  # packages named, the project excluded
        self.project_extras: list[set[str]] = []  # one set per `.` / `-e .[x,y]` target
        tokens = [t.strip("'\"") for t in text.split()]
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            i += 1
            if tok.startswith(("#", ">", "2>", "1>")):
                break  # a comment or a redirection: the command ends
            if not tok or "$" in tok or "..." in tok or tok.startswith("<"):
                continue  # a placeholder, as in setup-remote.sh's hint
            opt, eq, value = tok.partition("=")
            if opt in ("-e", "--editable"):
                target = value if eq else (tokens[i] if i < len(tokens) else "")
                i += 0 if eq else 1
                self.add_target(target)
            elif opt in VALUE_OPTIONS:
                value = value if eq else (tokens[i] if i < len(tokens) else "")
                i += 0 if eq else 1
                if opt in ("-c", "--constraint"):
                    self.constraints.append(value)
                assert opt not in ("-r", "--requirement"), f"{self.where}: -r is not checked"
            elif tok.startswith("-"):
                continue  # a flag: --quiet, --upgrade, --no-deps, ...
            else:
                self.add_target(tok)

    def add_target(self, target: str) -> None:
        m = re.fullmatch(r"\./?(?:\[([^\]]*)\])?", target)
        if m:
            self.project_extras.append({e.strip() for e in (m.group(1) or "").split(",") if e})
        else:
            self.requirements.append(Requirement(target))

    @property
    def self_upgrade(self) -> bool:
        """`pip install --upgrade pip`: the installer itself, before any constraint applies."""
        return [canonicalize_name(r.name) for r in self.requirements] == ["pip"] and not (
            self.project_extras)

    @property
    def installs_something(self) -> bool:
        return bool(self.requirements or self.project_extras)


def install_files() -> list[Path]:
    files = [p for p in sorted(INFRA.rglob("*")) if p.is_file()]
    return files + [ROOT / "docs" / "scale.md", ROOT / "Makefile"]


def installs() -> list[Install]:
    found = []
    for path in install_files():
        if not path.exists():
            continue
        lines = path.read_text(errors="replace").splitlines()
        for lineno, line in enumerate(lines, 1):
            for m in re.finditer(r"pip install(?=\s|$)", line):
                rest = line[m.end():]
                if line[: m.start()].count("`") % 2 and "`" not in rest and lineno < len(lines):
                    # an inline code span wrapped onto the next line of a comment or paragraph
                    rest += " " + lines[lineno].lstrip("# \t")
                end = LINE_END.search(rest)
                found.append(Install(path, lineno, rest[: end.start()] if end else rest))
    return found


@pytest.fixture(scope="module")
def install_lines() -> list[Install]:
    return installs()


def test_install_lines_are_found(install_lines):
    # The parser sees the installs this test is about; an empty scan would pass vacuously.
    by_file = {}
    for inst in install_lines:
        by_file.setdefault(inst.path.relative_to(ROOT).as_posix(), []).append(inst)
    assert any({"cluster"} in i.project_extras for i in by_file["infra/docker/Dockerfile"])
    assert any({"cluster"} in i.project_extras for i in by_file["infra/ray/cluster.yaml"])
    assert any({"dev"} in i.project_extras for i in by_file["Makefile"])
    mlflow = [i for i in by_file["infra/mlflow/Dockerfile"] if i.installs_something]
    assert len(mlflow) == 1 and len(mlflow[0].requirements) == 3, [i.where for i in mlflow]
    assert "infra/dvc/setup-remote.sh" in by_file and "infra/dvc/README.md" in by_file


def test_every_installed_package_is_pinned(install_lines, pinned):
    problems = []
    for inst in install_lines:
        if inst.self_upgrade:
            continue
        for req in inst.requirements:
            if problem := pin_problem(req, pinned):
                problems.append(f"{inst.where}: {problem}")
        for extras in inst.project_extras:
            for req in project_requirements(extras):
                if problem := pin_problem(req, pinned):
                    problems.append(f"{inst.where}: the project's {problem}")
    assert not problems, "\n".join(problems)


def test_dvc_plugins_setup_remote_asks_for_are_pinned(pinned):
    # setup-remote.sh prints `pip install -c constraints.txt $3`; $3 comes from these calls.
    text = (INFRA / "dvc" / "setup-remote.sh").read_text()
    plugins = re.findall(r"^\s*need_plugin \S+ \S+ (\S+)", text, flags=re.M)
    assert {"dvc-s3", "dvc-ssh"} <= set(plugins), plugins
    problems = [p for name in plugins if (p := pin_problem(Requirement(name), pinned))]
    assert not problems, "\n".join(problems)


def test_every_install_line_passes_the_constraints(install_lines):
    unconstrained = []
    for inst in install_lines:
        if inst.self_upgrade or not inst.installs_something:
            continue
        allowed = CONSTRAINT_PATHS_BY_FILE.get(inst.path, CONSTRAINT_PATHS)
        if not set(inst.constraints) & allowed:
            unconstrained.append(f"{inst.where}: no `-c {' or '.join(sorted(allowed))}`")
    assert not unconstrained, "\n".join(unconstrained)


def test_mlflow_image_installs_the_mlflow_server_extra(install_lines):
    # Its build context holds constraints.txt alone, so it names the extra's packages itself.
    text = MLFLOW_DOCKERFILE.read_text()
    assert re.search(r"^COPY constraints\.txt /tmp/constraints\.txt$", text, flags=re.M)
    (inst,) = [i for i in install_lines if i.path == MLFLOW_DOCKERFILE and i.installs_something]
    named = {canonicalize_name(r.name) for r in inst.requirements}
    extra = {canonicalize_name(r.name) for r in project_requirements(["mlflow-server"])[
        len(project()["dependencies"]):]}
    assert named == extra, f"{inst.where} installs {sorted(named)}, the extra {sorted(extra)}"


# pyproject.toml ------------------------------------------------------------------------------


def test_extras_exist():
    optional = project()["optional-dependencies"]
    assert {"dev", "cluster", "mlflow-server"} <= set(optional), sorted(optional)
    cluster = {canonicalize_name(Requirement(r).name) for r in optional["cluster"]}
    assert {"ray", "boto3", "dvc-s3", "dvc-ssh"} <= cluster
    assert any(Requirement(r).extras == {"default"} for r in optional["cluster"])


def test_every_pyproject_requirement_is_pinned_within_its_specifier(pinned):
    reqs = project_requirements(project()["optional-dependencies"])
    assert len(reqs) > 20
    problems = [p for r in reqs if (p := pin_problem(r, pinned))]
    assert not problems, "\n".join(problems)


# what the installed metadata requires ----------------------------------------------------------


def installed() -> dict[str, importlib.metadata.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions()}


def requirement_problems(dist, extras: set[str], pinned: dict[str, str]):
    """(problems, requirements that apply) for `dist` installed with `extras`."""
    problems, applied = [], []
    for line in dist.requires or []:
        req = Requirement(line)
        wanted = [""] + sorted(extras)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in wanted):
            continue
        applied.append(req)
        if problem := pin_problem(req, pinned):
            problems.append(f"{dist.metadata['Name']} requires `{req}`: {problem}")
    return problems, applied


def test_ray_default_extra_is_pinned(pinned):
    # The cluster extra asks for ray[default]: every requirement ray's own metadata gives that
    # extra (aiohttp-cors, colorful, opencensus, py-spy, smart-open, virtualenv, grpcio, ...)
    # is pinned, within ray's specifier.
    ray = installed().get("ray")
    assert ray is not None, "ray is not installed (make install)"
    assert ray.version == pinned["ray"], f"installed ray {ray.version}, pin {pinned['ray']}"
    default = [
        Requirement(line) for line in ray.requires or []
        if Requirement(line).marker is not None
        and Requirement(line).marker.evaluate({"extra": "default"})
        and not Requirement(line).marker.evaluate({"extra": ""})
    ]
    names = {canonicalize_name(r.name) for r in default}
    assert {"aiohttp-cors", "colorful", "opencensus", "py-spy", "smart-open", "virtualenv"} <= names
    problems = [p for r in default if (p := pin_problem(r, pinned))]
    assert not problems, "\n".join(problems)


def test_installed_requirement_closure_is_pinned(pinned):
    # From every requirement pyproject.toml names (all extras), walk the metadata of whatever is
    # installed at its pinned version: each requirement met on the way must be pinned, within
    # its specifier. What is not installed here (boto3, dvc-s3, dvc-ssh: `make install` installs
    # .[dev] only) cannot be walked; ray, with its `default` extra, is.
    dists = installed()
    queue = [(canonicalize_name(r.name), set(r.extras))
             for r in project_requirements(project()["optional-dependencies"])]
    seen: dict[str, set[str]] = {}
    problems = []
    while queue:
        name, extras = queue.pop()
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        dist = dists.get(name)
        if dist is None or dist.version != pinned.get(name):
            continue
        found, applied = requirement_problems(dist, extras, pinned)
        problems += found
        queue += [(canonicalize_name(r.name), set(r.extras)) for r in applied]
    assert "default" in seen.get("ray", set())
    assert len(seen) > 200, len(seen)
    assert not problems, "\n".join(problems)

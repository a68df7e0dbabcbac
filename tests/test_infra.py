"""The deployment files under infra/ (and docs/scale.md) stay consistent with the code.

Nothing here starts a container or a cluster: the files are parsed and checked against the
schemas the tools ship (Ray's cluster schema, Prefect's prefect.yaml model), the CLI's parser,
the flows' source (by `ast`, without importing them) and the pins in pyproject.toml and
constraints.txt.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SCALE_DOC = ROOT / "docs" / "scale.md"

MLFLOW_COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
PREFECT_COMPOSE = INFRA / "prefect" / "docker-compose.yaml"
PREFECT_YAML = INFRA / "prefect" / "prefect.yaml"
RAY_CLUSTER = INFRA / "ray" / "cluster.yaml"
KUBERAY = INFRA / "k8s" / "raycluster.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
COMPOSE_FILES = [MLFLOW_COMPOSE, PREFECT_COMPOSE]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_spec(name: str) -> SpecifierSet:
    """The specifier pyproject.toml gives a dependency (extras dropped)."""
    for dep in pyproject()["dependencies"]:
        m = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)", dep)
        if m and canonicalize_name(m.group(1)) == canonicalize_name(name):
            return SpecifierSet(m.group(3))
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def infra_text_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


def services(compose: Path) -> dict:
    return load(compose)["services"]


def command_of(service: dict) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


# (a) every YAML file parses; the compose files and manifests have what they should ----------


def test_every_yaml_file_under_infra_parses():
    files = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
    expected = {MLFLOW_COMPOSE, PREFECT_COMPOSE, PREFECT_YAML, RAY_CLUSTER, KUBERAY}
    assert expected <= set(files), f"missing: {sorted(map(str, expected - set(files)))}"
    for path in files:
        docs = load_all(path)
        assert docs, f"{path}: no YAML document"
        assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"


def test_mlflow_compose_services():
    svc = services(MLFLOW_COMPOSE)
    assert {"postgres", "minio", "create-bucket", "mlflow"} <= set(svc)
    cmd = command_of(svc["mlflow"])
    uri = r"postgresql(\+\w+)?://\w+:(\$\{[^}]*\}|[^@\s]+)@postgres:5432/\w+"
    assert re.search(rf"--backend-store-uri {uri}", cmd), cmd
    assert re.search(r"--artifacts-destination s3://\S+", cmd), cmd
    assert "--host 0.0.0.0" in cmd  # inside the container; the published side is 127.0.0.1
    env = svc["mlflow"]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    deps = svc["mlflow"]["depends_on"]
    assert deps["create-bucket"]["condition"] == "service_completed_successfully"
    assert deps["postgres"]["condition"] == "service_healthy"
    assert "mc mb" in command_of(svc["create-bucket"])
    assert (INFRA / "mlflow" / ".env.example").is_file()


def test_prefect_compose_services():
    svc = services(PREFECT_COMPOSE)
    assert {"postgres", "prefect-server", "prefect-worker"} <= set(svc)
    assert command_of(svc["prefect-server"]).startswith("prefect server start")
    worker = command_of(svc["prefect-worker"])
    assert re.search(r"prefect worker start --pool rae-pool\b", worker), worker
    assert "--type process" in worker
    url = svc["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    assert svc["prefect-worker"]["environment"]["PREFECT_API_URL"] == \
        "http://prefect-server:4200/api"
    # The worker reaches MLflow on the network the MLflow stack creates.
    mlflow_net = load(MLFLOW_COMPOSE)["networks"]["default"]["name"]
    prefect_nets = load(PREFECT_COMPOSE)["networks"]
    external = [k for k, v in prefect_nets.items() if (v or {}).get("external")]
    assert mlflow_net in external and mlflow_net in svc["prefect-worker"]["networks"]


def test_kuberay_manifest():
    docs = load_all(KUBERAY)
    by_kind = {d["kind"]: d for d in docs}
    cluster, pvc = by_kind["RayCluster"], by_kind["PersistentVolumeClaim"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    groups = cluster["spec"]["workerGroupSpecs"]
    head_limits = head["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits, "the head group is the CPU group"
    gpu_groups = [g for g in groups
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]
                  .get("limits", {})]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    images = set()
    for pod in [head] + [g["template"]["spec"] for g in groups]:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {pvc["metadata"]["name"]}
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {"/app/data", "/app/models", "/app/runs"} <= mounts
        images |= {c["image"] for c in pod["containers"] + pod.get("initContainers", [])}
    assert len(images) == 1, f"one platform image everywhere, got {images}"


def ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")  # locates the package without importing it
    assert spec is not None and spec.origin
    return json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_cluster_yaml_matches_the_schema_ray_ships():
    jsonschema = pytest.importorskip("jsonschema")
    cfg = load(RAY_CLUSTER)
    jsonschema.validate(cfg, ray_schema())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items()
                 if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) == 8]
    assert gpu_types, "no worker node type with 8 GPUs"
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in start and "--port=6380" in start
    assert "RAY_USAGE_STATS_ENABLED=0" in start
    assert "--dashboard-host=0.0.0.0" not in start
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "$RAY_HEAD_IP:6380" in workers


def test_prefect_yaml_matches_prefects_own_model():
    models = pytest.importorskip("prefect.cli.deploy._models")
    schedules = pytest.importorskip("prefect.client.schemas.schedules")
    raw = load(PREFECT_YAML)
    parsed = models.PrefectYamlModel.model_validate(raw)
    names = {d.name for d in parsed.deployments}
    assert {"reproduce-smoke", "reproduce-tiny", "pipeline"} <= names
    pull = raw["pull"]
    assert any("prefect.deployments.steps.set_working_directory" in step for step in pull)
    crons = {}
    for dep in raw["deployments"]:
        assert dep["work_pool"]["name"] == "rae-pool"
        for item in dep.get("schedules", []):
            models.RawScheduleConfig.model_validate(item)  # unknown keys are refused
            schedules.CronSchedule(cron=item["cron"], timezone=item.get("timezone"))
            crons[dep["name"]] = item["cron"]
    assert crons == {"reproduce-smoke": "0 3 * * *", "reproduce-tiny": "0 4 * * 0"}


# (b) every entry point in prefect.yaml resolves, without importing the flows ----------------


def flow_function(entrypoint: str) -> tuple[ast.FunctionDef, str | None]:
    """The module-level function an entrypoint names, and its @flow(name=...)."""
    rel, func = entrypoint.rsplit(":", 1)
    path = ROOT / rel
    assert path.is_file(), f"{entrypoint}: {rel} does not exist"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == func:
            flow_name = None
            is_flow = False
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if (isinstance(target, ast.Name) and target.id == "flow") or \
                        (isinstance(target, ast.Attribute) and target.attr == "flow"):
                    is_flow = True
                    for kw in getattr(dec, "keywords", []):
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            flow_name = kw.value.value
            assert is_flow, f"{entrypoint}: {func} is not decorated with @flow"
            return node, flow_name
    raise AssertionError(f"{entrypoint}: {rel} defines no module-level function {func}")


def signature(fn: ast.FunctionDef) -> tuple[set[str], set[str]]:
    """All parameter names of a function, and those without a default."""
    args = fn.args
    positional = args.posonlyargs + args.args
    required = {a.arg for a in positional[: len(positional) - len(args.defaults)]}
    required |= {a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
                 if d is None}
    names = {a.arg for a in positional + args.kwonlyargs}
    return names, required


def test_prefect_entrypoints_resolve_with_their_parameters():
    deployments = load(PREFECT_YAML)["deployments"]
    expected = {"reproduce-smoke": "flows/reproduce.py:reproduce_flow",
                "reproduce-tiny": "flows/reproduce.py:reproduce_flow",
                "pipeline": "flows/pipeline.py:pipeline_flow"}
    assert {d["name"]: d["entrypoint"] for d in deployments} == expected
    for dep in deployments:
        fn, _ = flow_function(dep["entrypoint"])
        names, required = signature(fn)
        given = set(dep.get("parameters") or {})
        assert given <= names, f"{dep['name']}: {sorted(given - names)} not in {fn.name}()"
        if dep.get("schedules"):  # nobody is there to supply the rest of a scheduled run
            assert required <= given, f"{dep['name']}: missing {sorted(required - given)}"
    presets = {d["name"]: d["parameters"] for d in deployments if d.get("schedules")}
    assert presets == {"reproduce-smoke": {"preset": "smoke"}, "reproduce-tiny": {"preset": "tiny"}}


def test_deployment_names_quoted_in_comments_exist():
    """`prefect deployment run FLOW/DEPLOYMENT` in the comments names real ones."""
    text = PREFECT_YAML.read_text()
    deployments = {d["name"]: d for d in load(PREFECT_YAML)["deployments"]}
    quoted = re.findall(r"prefect deployment run '?([\w-]+)/([\w-]+)", text)
    assert quoted, "the comments should show how to run the pipeline deployment"
    for flow_name, dep_name in quoted:
        assert dep_name in deployments, dep_name
        _, declared = flow_function(deployments[dep_name]["entrypoint"])
        assert declared == flow_name, f"{flow_name}/{dep_name}: the flow is named {declared}"


# (c) every `rae <subcommand>` in infra/ and docs/scale.md is real -----------------------------

RAE_CALL = re.compile(r"(?:^|(?<=[\s(;|&`])|(?<=bin/))rae[ \t]+([a-z][\w-]*)([^\n`'\"#]*)")


def rae_calls() -> list[tuple[Path, str, list[str]]]:
    calls = []
    for path in [*infra_text_files(), SCALE_DOC]:
        for m in RAE_CALL.finditer(path.read_text()):
            rest = re.split(r"&&|\|\||[|;\\]", m.group(2))[0]
            calls.append((path, m.group(1), shlex.split(rest, comments=True)))
    return calls


def cli_parser():
    from flows.cli import parser

    return parser()


def test_rae_commands_in_infra_and_docs_are_real_subcommands():
    p = cli_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    calls = rae_calls()
    found = {name for _, name, _ in calls}
    assert {"run", "params"} <= found, f"too few `rae` commands found: {found}"
    for path, name, _ in calls:
        assert name in sub.choices, f"{path.relative_to(ROOT)}: `rae {name}` is no subcommand"


def test_rae_command_lines_parse():
    p = cli_parser()
    for path, name, args in rae_calls():
        kept: list[str] = []
        for tok in args:
            if "$" in tok or "..." in tok or "<" in tok:  # placeholders
                if kept and kept[-1].startswith("--"):
                    kept.pop()
                continue
            kept.append(tok)
        try:
            p.parse_args([name, *kept])
        except SystemExit:
            pytest.fail(f"{path.relative_to(ROOT)}: `rae {name} {' '.join(kept)}` does not parse")


# (d) versions pinned in infra/ agree with pyproject.toml and constraints.txt -----------------


def test_mlflow_version_matches_constraints():
    pinned = constraints()["mlflow"]
    assert pinned in requirement_spec("mlflow")
    installs = re.findall(r"mlflow==([\w.]+)", MLFLOW_DOCKERFILE.read_text())
    assert installs == [pinned], f"infra/mlflow/Dockerfile installs {installs}, pin {pinned}"
    image = services(MLFLOW_COMPOSE)["mlflow"]["image"]
    assert image.endswith(f":{pinned}"), image


def test_prefect_version_matches_constraints():
    pinned = constraints()["prefect"]
    assert pinned in requirement_spec("prefect")
    assert str(load(PREFECT_YAML)["prefect-version"]) == pinned


def test_ray_version_matches_constraints():
    pinned = constraints()["ray"]
    assert pinned in requirement_spec("ray")
    cluster = next(d for d in load_all(KUBERAY) if d["kind"] == "RayCluster")
    assert str(cluster["spec"]["rayVersion"]) == pinned


def test_python_versions_match_requires_python():
    allowed = SpecifierSet(pyproject()["requires-python"])
    seen = []
    for path in [DOCKERFILE, MLFLOW_DOCKERFILE]:
        seen += re.findall(r"^FROM python:(\d+\.\d+)", path.read_text(), flags=re.M)
    seen += re.findall(r"python(3\.\d+)", RAY_CLUSTER.read_text())
    assert len(seen) >= 3, seen
    for version in seen:
        assert version in allowed, f"Python {version} outside requires-python {allowed}"


def test_platform_image_tag_is_the_project_version():
    version = pyproject()["version"]
    tags = set(re.findall(r"rae-platform:([\w.-]+)", "\n".join(
        p.read_text() for p in infra_text_files())))
    assert tags == {version}, f"rae-platform image tags {tags}, project version {version}"


# (e) the image installs the project exactly as the Makefile does -----------------------------


def test_dockerfile_installs_like_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    assert "-m venv $(VENV)" in makefile or "python3 -m venv" in makefile
    assert re.search(r"pip install .*-c constraints\.txt -e ", makefile)
    text = DOCKERFILE.read_text()
    assert re.search(r"^WORKDIR /app$", text, flags=re.M)
    assert "python3 -m venv .venv" in text
    assert re.search(r"pip install -c constraints\.txt -e \.(\s|$)", text)
    assert "PATH=/app/.venv/bin:$PATH" in text
    for path in [DOCKERFILE, MLFLOW_DOCKERFILE]:
        for line in re.findall(r"pip install[^\n\\&]*", path.read_text()):
            if "--upgrade pip" not in line:
                assert "-c " in line, f"{path.relative_to(ROOT)}: unconstrained `{line}`"
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore, "COPY . . would overwrite the image's virtualenv"


def test_ray_cluster_setup_installs_like_the_makefile():
    setup = " ".join(load(RAY_CLUSTER)["setup_commands"])
    assert re.search(r"python3\.\d+ -m venv \.venv", setup)
    assert re.search(r"pip install (--quiet )?-c constraints\.txt -e \.", setup)


# (f) nothing listens beyond localhost, and no secret is committed -----------------------------


def test_compose_ports_bind_localhost_only():
    published = 0
    for compose in COMPOSE_FILES:
        for name, svc in services(compose).items():
            for port in svc.get("ports", []):
                published += 1
                where = f"{compose.relative_to(ROOT)}: {name}: {port}"
                if isinstance(port, dict):
                    assert port.get("host_ip") == "127.0.0.1", where
                else:
                    assert str(port).startswith("127.0.0.1:"), where
            assert svc.get("network_mode") != "host", f"{name} uses the host network"
    assert published >= 2


def test_kubernetes_exposes_nothing_outside_the_cluster():
    text = KUBERAY.read_text()
    assert "hostNetwork: true" not in text and "hostPort" not in text
    assert "LoadBalancer" not in text and "NodePort" not in text


SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{36}\b",
    "Slack token": r"\bxox[abpr]-[A-Za-z0-9-]{10,}",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN", re.I)
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.I)
PG_PASSWORD = re.compile(r"postgresql(?:\+\w+)?://[^:/\s]+:(\$\{[^}]*\}|[^@\s]+)@")


def test_no_real_looking_secret_is_committed():
    for path in [*infra_text_files(), SCALE_DOC]:
        text = path.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            assert not re.search(pattern, text), f"{path.relative_to(ROOT)}: {what}"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                             "--", "infra"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert not [f for f in listed.stdout.split() if Path(f).name == ".env"], "a .env in git"
    for compose in COMPOSE_FILES:  # where the stacks read their secrets from: never committed
        env_file = (compose.parent / ".env").relative_to(ROOT)
        ignored = subprocess.run(["git", "check-ignore", "-q", str(env_file)], cwd=ROOT,
                                 timeout=30)
        assert ignored.returncode == 0, f"{env_file} is not git-ignored"
    examples = sorted(INFRA.rglob(".env.example"))
    assert examples
    for example in examples:
        for line in example.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, value = line.split("=", 1)
                if SECRET_NAME.search(key):
                    assert value.strip() == "change-me", f"{example}: {key} has a value"


def test_compose_secrets_come_from_the_env_file():
    for compose in COMPOSE_FILES:
        passwords = PG_PASSWORD.findall(compose.read_text())
        assert passwords, f"{compose.relative_to(ROOT)}: no database URL found"
        for password in passwords:
            assert password.startswith("${") and ":-" not in password, password
        for name, svc in services(compose).items():
            env = svc.get("environment", {})
            items = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
            for key, value in items:
                if CREDENTIAL_NAME.search(key):
                    value = str(value)
                    assert value.startswith("${") and ":-" not in value, \
                        f"{compose.relative_to(ROOT)}: {name}: {key} is not from .env"


def test_dvc_setup_script_needs_a_url():
    res = subprocess.run(["bash", str(INFRA / "dvc" / "setup-remote.sh")], capture_output=True,
                         text=True, cwd=ROOT, timeout=30)
    assert res.returncode == 2
    assert res.stderr.startswith("usage: ") and len(res.stderr.strip().splitlines()) == 1
    assert res.stdout == ""

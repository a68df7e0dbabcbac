"""The deployment files under infra/ (and docs/scale.md) stay consistent with the code.

Nothing here starts a container or a cluster: the files are parsed and checked against the
schemas the tools ship (Ray's cluster schema, Prefect's prefect.yaml model), the CLI's parser,
the flows' source (by `ast`, without importing them) and the pins in pyproject.toml and
constraints.txt; one test calls the deployed flow's function to see it refuse what it must.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import constraint_pins, git
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from rae_core.errors import ConfigError

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
                "pipeline": "flows/pipeline.py:run_flow"}
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
    pinned = constraint_pins()["mlflow"]
    assert pinned in requirement_spec("mlflow")
    installs = re.findall(r"mlflow==([\w.]+)", MLFLOW_DOCKERFILE.read_text())
    assert installs == [pinned], f"infra/mlflow/Dockerfile installs {installs}, pin {pinned}"
    image = services(MLFLOW_COMPOSE)["mlflow"]["image"]
    assert image.endswith(f":{pinned}"), image


def test_prefect_version_matches_constraints():
    pinned = constraint_pins()["prefect"]
    assert pinned in requirement_spec("prefect")
    assert str(load(PREFECT_YAML)["prefect-version"]) == pinned


def test_ray_version_matches_constraints():
    pinned = constraint_pins()["ray"]
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


def test_platform_images_are_tagged_by_commit_with_an_explicit_pull_policy():
    """No image of the platform carries a fixed tag: compose uses the commit tag build.sh
    printed, the manifests the RAE_IMAGE it exported; every such service says how it pulls."""
    fixed = re.findall(r"rae-platform:(?!\$\{RAE_IMAGE_TAG)[\w.-]+", "\n".join(
        p.read_text() for p in infra_text_files() if p.suffix in (".yaml", ".yml")))
    assert not fixed, f"fixed rae-platform tags: {fixed}"
    for compose in COMPOSE_FILES:
        for name, svc in services(compose).items():
            image = svc.get("image", "")
            if image.startswith(("rae-platform", "rae-mlflow")):
                assert svc.get("pull_policy") in ("never", "build"), f"{compose.name}: {name}"
            if image.startswith("rae-platform"):
                assert image.startswith("rae-platform:${RAE_IMAGE_TAG:?"), image


def test_build_script_tags_by_commit_and_refuses_a_dirty_tree(tmp_path):
    script = INFRA / "docker" / "build.sh"
    repo = tmp_path / "repo"
    (repo / "infra" / "docker").mkdir(parents=True)
    shutil.copy(script, repo / "infra" / "docker" / "build.sh")
    (repo / "file").write_text("a")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "x")
    (repo / "file").write_text("b")  # a tracked change: the tag would not name the code
    res = subprocess.run(["bash", "infra/docker/build.sh"], cwd=repo, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "uncommitted changes" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stdout == ""
    usage = subprocess.run(["bash", str(script), "a", "b"], capture_output=True, text=True,
                           timeout=30)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: ")
    text = script.read_text()
    assert 'tag=${commit:0:12}' in text and '-t "$repo:$tag"' in text
    assert 'GIT_COMMIT=$commit' in text
    assert re.search(r"^ARG GIT_COMMIT", DOCKERFILE.read_text(), flags=re.M)


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


def test_compose_ports_bind_localhost_unless_a_private_address_is_given():
    """Published on 127.0.0.1, or on RAE_BIND_ADDRESS (the services host's private address)
    with 127.0.0.1 as its default; never on every interface."""
    published = 0
    for compose in COMPOSE_FILES:
        for name, svc in services(compose).items():
            for port in svc.get("ports", []):
                published += 1
                where = f"{compose.relative_to(ROOT)}: {name}: {port}"
                assert not isinstance(port, dict), where
                assert str(port).startswith(("127.0.0.1:", "${RAE_BIND_ADDRESS:-127.0.0.1}:")), \
                    where
            assert svc.get("network_mode") != "host", f"{name} uses the host network"
    assert published >= 2


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


# (g) the pieces connect: names, ports, job variables, the worker service, the walk-through ---

CLUSTER_ENVS = sorted((INFRA / "prefect").glob("cluster-*.env"))
SYSTEMD_UNIT = INFRA / "systemd" / "rae-prefect-worker.service"
INFRA_README = INFRA / "README.md"
LOOPBACK = {"127.0.0.1", "localhost"}


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def k8s_services() -> dict[str, dict]:
    docs = [d for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in load_all(p)]
    return {d["metadata"]["name"]: d["spec"] for d in docs if d.get("kind") == "Service"}


def service_ports() -> dict[str, int]:
    """Every host name a client may use for a team service, with the port it serves on: the
    compose services (by the port their server command binds), the Kubernetes Services, and
    the private DNS names those Services point at."""
    ports: dict[str, int] = {}
    for compose in COMPOSE_FILES:
        for name, svc in services(compose).items():
            m = re.search(r"--port[ ,'\"]+(\d+)", command_of(svc))
            if m:
                ports[name] = int(m.group(1))
    ports["minio"] = 9000  # MinIO's own S3 port, inside the compose network
    for name, spec in k8s_services().items():
        (port,) = {p["port"] for p in spec["ports"]}
        ports[name] = port
        if spec.get("type") == "ExternalName":
            ports[spec["externalName"]] = port
    return ports


def service_urls() -> list[tuple[Path, str, int]]:
    files = [p for p in infra_text_files() if p.suffix not in (".sh",)] + [SCALE_DOC,
                                                                          ROOT / "README.md"]
    found = []
    for path in files:
        for host, port in re.findall(r"https?://([A-Za-z0-9_.-]+):(\d+)", path.read_text()):
            found.append((path, host, int(port)))
    return found


def mlflow_allowed_hosts() -> list[str]:
    cmd = command_of(services(MLFLOW_COMPOSE)["mlflow"])
    default = re.search(r"--allowed-hosts \$\{MLFLOW_ALLOWED_HOSTS:-([^}]*)\}", cmd).group(1)
    example = env_file(INFRA / "mlflow" / ".env.example")["MLFLOW_ALLOWED_HOSTS"]
    assert default == example, "the compose default and .env.example admit different hosts"
    return default.split(",")


def test_every_service_url_names_a_host_and_port_that_exist():
    ports = service_ports()
    assert ports["mlflow.rae.internal"] == ports["mlflow"] == 5000
    assert ports["prefect.rae.internal"] == ports["prefect"] == ports["prefect-server"] == 4200
    urls = service_urls()
    assert len(urls) > 10
    for path, host, port in urls:
        where = f"{path.relative_to(ROOT)}: http://{host}:{port}"
        if host in LOOPBACK:
            assert port in (5000, 4200, 8265, 9001) or path == ROOT / "README.md", where
            continue
        if host.endswith(".example.com"):
            continue
        assert host in ports, f"{where}: no compose service, Service or documented DNS name"
        assert ports[host] == port, f"{where}: {host} serves on {ports[host]}"


def test_the_private_dns_names_are_documented_and_point_where_the_services_are():
    text = INFRA_README.read_text()
    for name, target in (("mlflow", "mlflow.rae.internal"), ("prefect", "prefect.rae.internal")):
        assert f"`{target}`" in text, f"infra/README.md does not document {target}"
        assert k8s_services()[name] == {**k8s_services()[name], "type": "ExternalName",
                                        "externalName": target}


def test_the_mlflow_server_admits_every_name_its_clients_use():
    allowed = mlflow_allowed_hosts()
    clients = {(host, port) for _, host, port in service_urls() if port == 5000}
    for host, port in clients:
        assert host in allowed and f"{host}:*" in allowed, f"{host}:{port} is refused"


def test_cluster_env_files_fill_every_placeholder_of_the_pipeline_deployment():
    raw = load(PREFECT_YAML)
    (pipeline,) = [d for d in raw["deployments"] if d["name"] == "pipeline"]
    env = pipeline["work_pool"]["job_variables"]["env"]
    assert set(env) == {"RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAE_PROJECT_DIR"}
    placeholders = {m for v in env.values() for m in re.findall(r"\{\{ \$(\w+) \}\}", v)}
    assert len(placeholders) == len(env)
    assert {p.name for p in CLUSTER_ENVS} == {"cluster-aws.env", "cluster-k8s.env"}
    ray_user = load(RAY_CLUSTER)["auth"]["ssh_user"]
    project_dirs = {"cluster-aws.env": f"/home/{ray_user}/rae", "cluster-k8s.env": "/app"}
    assert "~/rae" in load(RAY_CLUSTER)["file_mounts"]
    for path in CLUSTER_ENVS:
        values = env_file(path)
        assert set(values) == placeholders, f"{path.name}: {sorted(values)}"
        resolved = {k: re.sub(r"\{\{ \$(\w+) \}\}", lambda m, vals=values: vals[m.group(1)], v)
                    for k, v in env.items()}
        assert resolved["RAY_ADDRESS"] == "auto"  # the worker runs on the head: its cluster
        assert resolved["RAE_PROJECT_DIR"] == project_dirs[path.name]
        host = re.match(r"http://([\w.-]+):5000$", resolved["MLFLOW_TRACKING_URI"]).group(1)
        assert host in mlflow_allowed_hosts()
    # the scheduled runs: a local Ray on the compose worker, its MLflow by its compose name
    worker_env = services(PREFECT_COMPOSE)["prefect-worker"]["environment"]
    for dep in raw["deployments"]:
        if dep.get("schedules"):
            env = dep["work_pool"]["job_variables"]["env"]
            assert env["RAY_ADDRESS"] == "local"
            assert env["MLFLOW_TRACKING_URI"] == worker_env["MLFLOW_TRACKING_URI"]
            assert env["RAE_PROJECT_DIR"] == worker_env["RAE_PROJECT_DIR"] == "/app"


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, value = line.split("=", 1)
            current.setdefault(key, []).append(value)
    return sections


def test_the_head_runs_the_cluster_queue_worker_as_a_supervised_service():
    unit = unit_file(SYSTEMD_UNIT)
    service = unit["Service"]
    cfg = load(RAY_CLUSTER)
    user = cfg["auth"]["ssh_user"]
    assert service["User"] == [user]
    assert service["WorkingDirectory"] == [f"/home/{user}/rae"]
    assert service["Restart"] == ["always"] and service["KillMode"] == ["process"]
    (exec_start,) = service["ExecStart"]
    assert exec_start == (f"/home/{user}/rae/.venv/bin/prefect worker start --pool rae-pool "
                          "--work-queue cluster --type process")
    env = dict(item.split("=", 1) for line in service["Environment"] for item in line.split())
    assert env["PREFECT_API_URL"] == "http://prefect.rae.internal:4200/api"
    assert env["RAY_AUTH_MODE"] == "token"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    setup = " ".join(cfg["head_setup_commands"])
    assert f"infra/systemd/{SYSTEMD_UNIT.name}" in setup
    assert "systemctl enable rae-prefect-worker" in setup
    # the queue this worker polls is the pipeline deployment's
    (pipeline,) = [d for d in load(PREFECT_YAML)["deployments"] if d["name"] == "pipeline"]
    assert pipeline["work_pool"]["work_queue_name"] == "cluster"


def test_gpu_nodes_scale_to_zero_and_runs_wait_for_them():
    cfg = load(RAY_CLUSTER)
    for name, node in cfg["available_node_types"].items():
        if node["resources"].get("GPU"):
            assert node["min_workers"] == 0, name
    assert cfg["idle_timeout_minutes"] > 0
    from rae_core.presets import load_config

    for preset in ("imagenet256", "imagenet512", "imagenet256-dit"):
        assert load_config(None, preset).ray.scale_up_timeout_s >= 600, preset


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", INFRA_README.read_text(), flags=re.S)
    lines = [line.split("#", 1)[0].strip() if not line.lstrip().startswith("eval") else
             line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def test_every_command_of_the_walk_through_is_exercised():
    """Each command in infra/README.md is run by tests/test_deployments.py or names files that
    a static test here or in tests/test_k8s.py checks."""
    deployment_test = (ROOT / "tests" / "test_deployments.py").read_text()
    exercised = set(re.findall(r'^[A-Z_]+ = "(prefect [^"]+)"$', deployment_test, flags=re.M))
    assert len(exercised) == 4
    checks = [
        (r"cp (infra/\w+/\.env\.example) infra/\w+/\.env", lambda m: (ROOT / m[1]).is_file()),
        (r"docker compose -f (\S+) up -d( --build)?", lambda m: Path(ROOT / m[1]) in
         COMPOSE_FILES),
        (r'eval "\$\(infra/docker/build\.sh( \S+)? \| tail -1\)"', lambda m: True),
        (r"ray get-auth-token --generate", lambda m: True),
        (r"ray up (\S+)", lambda m: ROOT / m[1] == RAY_CLUSTER),
        (r"kubectl apply -f (infra/k8s/\S+\.yaml)", lambda m: (ROOT / m[1]).is_file()),
        (r"envsubst '\$RAE_IMAGE' < (infra/k8s/\S+\.yaml) \| kubectl (apply|create) -f -",
         lambda m: (ROOT / m[1]).is_file() and "${RAE_IMAGE}" in (ROOT / m[1]).read_text()),
        (r"set -a; \. (infra/prefect/cluster-\w+\.env); set \+a",
         lambda m: ROOT / m[1] in CLUSTER_ENVS),
        (r"export PREFECT_API_URL=http://prefect\.rae\.internal:4200/api", lambda m: True),
        (r"export MLFLOW_TRACKING_URI=http://mlflow\.rae\.internal:5000", lambda m: True),
        (r"rae leaderboard", lambda m: True),
        (r"prefect deployment run rae-run/pipeline -p preset=imagenet256 -p overrides='(.*)'",
         lambda m: bool(json.loads(m[1]))),
    ]
    commands = readme_commands()
    assert len(commands) >= 15
    for cmd in commands:
        if cmd in exercised:
            continue
        for pattern, ok in checks:
            m = re.fullmatch(pattern, cmd)
            if m:
                assert ok(m), f"infra/README.md: `{cmd}` names something that does not exist"
                break
        else:
            pytest.fail(f"infra/README.md: `{cmd}` is exercised by no test")


def test_the_imagenet_overrides_of_the_walk_through_are_valid_settings():
    from rae_core.presets import load_config

    (cmd,) = [c for c in readme_commands() if "preset=imagenet256" in c]
    overrides = json.loads(re.search(r"overrides='(.*)'", cmd).group(1))
    cfg = load_config(None, "imagenet256", overrides)
    assert cfg.data.source == "/mnt/shared/datasets/ilsvrc"
    assert all(v.split("=", 1)[1].startswith("/mnt/shared/") for v in overrides)


def test_machine_settings_of_dvc_never_go_into_the_committed_config():
    """A cache path or link type is one machine's: documented with --local (.dvc/config.local)."""
    lines = [line.strip() for p in [*infra_text_files(), SCALE_DOC]
             for line in p.read_text().splitlines()
             if re.search(r"\bdvc (cache dir|config) ", line)]
    assert lines, "the DVC cluster settings are documented somewhere"
    for line in lines:
        assert "--local" in line.split("#", 1)[0], f"`{line}` would be committed in .dvc/config"


def test_a_pipeline_run_from_an_unfilled_deployment_stops_in_one_line(monkeypatch, tmp_path):
    """A deployment registered without the cluster-*.env values hands its run the placeholder
    itself; the run names the variable instead of joining a Ray cluster called `{{ ... }}`."""
    from flows.pipeline import run_flow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "{{ $RAE_CLUSTER_RAY_ADDRESS }}")
    with pytest.raises(ConfigError) as e:
        run_flow.fn(preset="smoke")
    assert str(e.value).startswith("RAY_ADDRESS={{ $RAE_CLUSTER_RAY_ADDRESS }}: the deployment")
    assert "cluster-*.env" in str(e.value)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    with pytest.raises(ConfigError, match=r"until=evaluation: not a stage \(valid: prepare, "):
        run_flow.fn(preset="smoke", until="evaluation")
    with pytest.raises(ConfigError, match="generator.depht"):
        run_flow.fn(preset="smoke", overrides=["generator.depht=3"])
    assert not (tmp_path / "runs").exists()  # nothing started

"""The Kubernetes manifests under infra/k8s/ hold together.

Nothing here talks to a cluster. Core kinds (the PersistentVolumeClaim, the Services, and
every pod template, wrapped as a v1 PodTemplate) are validated offline against the
Kubernetes OpenAPI schemas that `kubernetes-validate` bundles, strict (unknown fields are
errors), for Kubernetes K8S_VERSION; those tests skip where the package is not installed.
No installable package ships the KubeRay CRD schemas, so RayCluster and RayJob get structural
checks written against the ray.io/v1 API of KubeRay 1.5.x (the field names of its
raycluster_types.go and rayjob_types.go); the rest are the platform's own rules: one shared
volume at the same paths everywhere, one per-commit image, the autoscaler, the Prefect
worker beside the Ray head, and nothing reachable from outside the cluster.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
RAYCLUSTER = K8S / "raycluster.yaml"
RAYJOB = K8S / "rayjob.yaml"
SERVICES = K8S / "services.yaml"

K8S_VERSION = "1.33"
IMAGE_VAR = "${RAE_IMAGE}"
SAMPLE_IMAGE = "registry.invalid/rae/rae-platform:0123456789ab"  # what build.sh exports
SHARED_CLAIM = "rae-shared"
SHARED_ROOT = "/mnt/shared"
SUBPATHS = {"/app/data": "rae/data", "/app/models": "rae/models", "/app/runs": "rae/runs"}
SHARED_DIRS = ["/mnt/shared/rae/data", "/mnt/shared/rae/models", "/mnt/shared/rae/runs",
               "/mnt/shared/datasets", "/mnt/shared/weights"]

# ray.io/v1 as of KubeRay 1.5.x: the fields each object may carry.
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend", "authOptions",
                   "gcsFaultToleranceOptions", "managedBy", "upgradeStrategy"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                      "securityContext", "idleTimeoutSeconds", "upscalingMode", "version"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template",
              "resources", "labels"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "numOfHosts", "rayStartParams", "template", "scaleStrategy", "suspend",
                "resources", "labels"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
               "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
               "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
               "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
               "shutdownAfterJobFinishes", "suspend"}


def manifests() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def load_all(path: Path, image: str | None = SAMPLE_IMAGE) -> list[dict]:
    """The documents of a manifest, after `envsubst '$RAE_IMAGE'` when `image` is given."""
    text = path.read_text()
    if image is not None:
        text = text.replace(IMAGE_VAR, image).replace("$RAE_IMAGE", image)
    return [d for d in yaml.safe_load_all(text) if d is not None]


def one(path: Path, kind: str, image: str | None = SAMPLE_IMAGE) -> dict:
    docs = [d for d in load_all(path, image) if d["kind"] == kind]
    assert len(docs) == 1, f"{path.name}: {len(docs)} {kind} documents"
    return docs[0]


def cluster(image: str | None = SAMPLE_IMAGE) -> dict:
    return one(RAYCLUSTER, "RayCluster", image)


def rayjob(image: str | None = SAMPLE_IMAGE) -> dict:
    return one(RAYJOB, "RayJob", image)


def head_pod(rc: dict) -> dict:
    return rc["spec"]["headGroupSpec"]["template"]["spec"]


def gpu_groups(rc: dict) -> list[dict]:
    groups = [g for g in rc["spec"]["workerGroupSpecs"]
              if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]
              .get("limits", {})]
    assert groups, "no worker group with nvidia.com/gpu limits"
    return groups


def platform_pods(rc: dict) -> dict[str, dict]:
    """The pod templates that run platform code: the head and every worker group."""
    pods = {"head": head_pod(rc)}
    pods |= {g["groupName"]: g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]}
    return pods


def all_pod_templates() -> dict[str, dict]:
    """Every pod template in the manifests (the RayJob's submitter too), as PodTemplateSpecs."""
    rc, job = cluster(), rayjob()
    templates = {"head": rc["spec"]["headGroupSpec"]["template"]}
    templates |= {g["groupName"]: g["template"] for g in rc["spec"]["workerGroupSpecs"]}
    templates["submitter"] = job["spec"]["submitterPodTemplate"]
    return templates


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def volumes(pod: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod.get("volumes", [])}


def mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def command_of(container: dict) -> str:
    return " ".join(container.get("command", []) + container.get("args", []))


def by_name(pod: dict, name: str) -> dict:
    found = [c for c in pod["containers"] if c["name"] == name]
    assert found, f"no container {name!r}"
    return found[0]


def services() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in load_all(SERVICES) if d["kind"] == "Service"}


# the files ------------------------------------------------------------------------------------


def test_manifests_hold_the_expected_objects():
    assert {p.name for p in manifests()} == {"raycluster.yaml", "rayjob.yaml", "services.yaml"}
    kinds = {p.name: sorted(d["kind"] for d in load_all(p)) for p in manifests()}
    assert kinds == {"raycluster.yaml": ["PersistentVolumeClaim", "RayCluster"],
                     "rayjob.yaml": ["RayJob"], "services.yaml": ["Service", "Service"]}
    for path in manifests():
        for doc in load_all(path):
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), path.name


def test_header_comments_show_the_workflow():
    text = RAYCLUSTER.read_text()
    for line in ["infra/docker/build.sh",
                 "kubectl apply -f infra/k8s/services.yaml",
                 "envsubst '$RAE_IMAGE' < infra/k8s/raycluster.yaml | kubectl apply -f -",
                 "envsubst '$RAE_IMAGE' < infra/k8s/rayjob.yaml | kubectl create -f -",
                 f"kubectl port-forward svc/{cluster()['metadata']['name']}-head-svc 8265:8265"]:
        assert line in text, f"raycluster.yaml's header does not show `{line}`"
    assert (INFRA / "docker" / "build.sh").is_file()
    assert "envsubst '$RAE_IMAGE' < infra/k8s/rayjob.yaml | kubectl create -f -" in \
        RAYJOB.read_text()
    # `create`: each run is a new RayJob, named by the API server
    assert rayjob()["metadata"].get("generateName") and "name" not in rayjob()["metadata"]


def test_no_kubectl_exec_anywhere_under_infra():
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        assert "kubectl exec" not in text, f"{path.relative_to(ROOT)}: `kubectl exec`"


# schemas --------------------------------------------------------------------------------------


def test_core_kinds_match_the_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate")
    checked = []
    for path in manifests():
        for doc in load_all(path):
            if "." in doc["apiVersion"].split("/")[0]:  # a CRD group such as ray.io
                continue
            try:
                kv.validate(doc, K8S_VERSION, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{path.name}: {doc['kind']}: {'.'.join(map(str, e.path))}: "
                            f"{e.message}")
            checked.append(doc["kind"])
    assert sorted(checked) == ["PersistentVolumeClaim", "Service", "Service"]


def test_pod_templates_match_the_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate")
    templates = all_pod_templates()
    # The autoscaler sidecar KubeRay adds takes autoscalerOptions' resources as they are.
    options = cluster()["spec"]["autoscalerOptions"]
    templates["autoscaler"] = {"spec": {"containers": [
        {"name": "autoscaler", "image": SAMPLE_IMAGE, "resources": options["resources"],
         "imagePullPolicy": options["imagePullPolicy"]}]}}
    for name, template in templates.items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                   "template": template}
        try:
            kv.validate(wrapped, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"pod template {name}: {'.'.join(map(str, e.path))}: {e.message}")
    assert set(templates) >= {"head", "submitter", "autoscaler", *gpu_groups_names()}


def gpu_groups_names() -> list[str]:
    return [g["groupName"] for g in gpu_groups(cluster())]


def test_kuberay_objects_use_ray_io_v1_fields():
    """Field names and value types of ray.io/v1 (KubeRay 1.5.x): no schema package exists."""
    rc, job = cluster(), rayjob()
    for obj in (rc, job):
        assert obj["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC, sorted(set(spec) - RAYCLUSTER_SPEC)
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER_OPTIONS
    assert spec["autoscalerOptions"]["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    assert isinstance(spec["autoscalerOptions"]["idleTimeoutSeconds"], int)
    assert spec["authOptions"] == {"mode": "token"}
    assert isinstance(spec["rayVersion"], str)
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP, sorted(set(head) - HEAD_GROUP)
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in [head, *groups]:
        # map[string]string: KubeRay refuses `num-cpus: 0` as a number
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group["template"]["spec"]["containers"], "no containers"
    for group in groups:
        assert set(group) <= WORKER_GROUP, sorted(set(group) - WORKER_GROUP)
        assert {"groupName", "rayStartParams", "template"} <= set(group)
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(group[key], int) and group[key] >= 0, key
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    jspec = job["spec"]
    assert set(jspec) <= RAYJOB_SPEC, sorted(set(jspec) - RAYJOB_SPEC)
    assert jspec["submissionMode"] in {"K8sJobMode", "HTTPMode", "InteractiveMode"}
    assert isinstance(jspec["entrypoint"], str) and isinstance(jspec["runtimeEnvYAML"], str)
    assert isinstance(yaml.safe_load(jspec["runtimeEnvYAML"]), dict)
    assert "rayClusterSpec" not in jspec, "clusterSelector and rayClusterSpec exclude each other"


# storage --------------------------------------------------------------------------------------


def test_the_shared_volume_is_read_write_many():
    pvc = one(RAYCLUSTER, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == SHARED_CLAIM
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    text = RAYCLUSTER.read_text()
    assert "370 MB/s" in text and "images/s" in text, "the read throughput the class needs"


def test_every_platform_container_mounts_the_shared_volume_at_the_same_paths():
    for pod_name, pod in platform_pods(cluster()).items():
        shared = [n for n, v in volumes(pod).items()
                  if v.get("persistentVolumeClaim", {}).get("claimName") == SHARED_CLAIM]
        assert len(shared) == 1, f"{pod_name}: the {SHARED_CLAIM} claim as one volume"
        claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes(pod).values()
                  if "persistentVolumeClaim" in v}
        assert claims == {SHARED_CLAIM}, f"{pod_name}: {claims}"
        for c in pod["containers"]:
            where = f"{pod_name}/{c['name']}"
            m = mounts(c)
            assert SHARED_ROOT in m, f"{where}: not mounted at {SHARED_ROOT}"
            assert m[SHARED_ROOT]["name"] == shared[0] and not m[SHARED_ROOT].get("subPath"), \
                f"{where}: {SHARED_ROOT} must be the whole volume"
            for path, sub in SUBPATHS.items():
                assert path in m, f"{where}: {path} not mounted"
                assert (m[path]["name"], m[path].get("subPath")) == (shared[0], sub), where
        for c in pod.get("initContainers", []):
            m = mounts(c)
            assert m.get(SHARED_ROOT, {}).get("name") == shared[0], f"{pod_name}/{c['name']}"
    assert {"prefect-worker", "ray-head"} <= {c["name"] for c in head_pod(cluster())["containers"]}


def test_the_init_container_makes_the_shared_dirs_as_root_for_uid_1000():
    for pod_name, pod in platform_pods(cluster()).items():
        inits = [c for c in pod.get("initContainers", []) if "mkdir" in command_of(c)]
        assert len(inits) == 1, f"{pod_name}: one init container that makes the directories"
        init = inits[0]
        assert init["securityContext"]["runAsUser"] == 0, f"{pod_name}: NFS needs root here"
        cmd = command_of(init)
        mkdir = re.search(r"mkdir -p ([^&;]+)", cmd)
        assert mkdir and set(SHARED_DIRS) <= set(mkdir.group(1).split()), cmd
        chown = re.search(r"&& chown 1000:1000 ([^&;]+)", cmd)
        assert chown, f"{pod_name}: no `&& chown 1000:1000` after the mkdir"
        assert set(SHARED_DIRS) <= set(chown.group(1).split()), cmd
        assert "-R" not in chown.group(0), "never recursively: the datasets live below"
        # each sub-path the containers mount is among what it makes
        for sub in SUBPATHS.values():
            assert f"{SHARED_ROOT}/{sub}" in SHARED_DIRS
    assert "fsGroup" in RAYCLUSTER.read_text() and "root" in RAYCLUSTER.read_text()


# images ---------------------------------------------------------------------------------------


def test_every_platform_image_is_the_per_commit_tag_pulled_if_not_present():
    seen = 0
    for path in manifests():
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(?:- )?image:\s*(.*)$", line)
            if m:
                assert m.group(1) == IMAGE_VAR, f"{path.name}: `{line.strip()}`"
                seen += 1
    raw_templates = {"head": cluster(None)["spec"]["headGroupSpec"]["template"],
                     "submitter": rayjob(None)["spec"]["submitterPodTemplate"]}
    raw_templates |= {g["groupName"]: g["template"]
                      for g in cluster(None)["spec"]["workerGroupSpecs"]}
    counted = 0
    for name, template in raw_templates.items():
        for c in containers(template["spec"]):
            assert c["image"] == IMAGE_VAR, f"{name}/{c['name']}: {c['image']}"
            assert c["imagePullPolicy"] == "IfNotPresent", f"{name}/{c['name']}"
            counted += 1
    assert counted == seen >= 6
    # the autoscaler runs the ray-head container's image: no other image may be named for it
    assert "image" not in cluster(None)["spec"]["autoscalerOptions"]
    for path in manifests():
        text = path.read_text()
        if IMAGE_VAR in text:  # the files applied through envsubst say what the tag is
            assert "12-char git commit" in text and "IfNotPresent" in text, path.name
        assert "${" not in text.replace(IMAGE_VAR, ""), f"{path.name}: a variable envsubst skips"
    assert {p.name for p in manifests() if IMAGE_VAR in p.read_text()} == \
        {"raycluster.yaml", "rayjob.yaml"}


# autoscaling ----------------------------------------------------------------------------------


def test_gpu_pods_are_started_by_the_autoscaler_from_zero():
    rc = cluster()
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["idleTimeoutSeconds"] == 1200
    # v2 would set the head pod's restartPolicy to Never: the Prefect sidecar would stay down
    assert options.get("version", "v1") == "v1"
    assert head_pod(rc).get("restartPolicy", "Always") == "Always"
    for group in gpu_groups(rc):
        assert group["replicas"] == 0 and group["minReplicas"] == 0, group["groupName"]
        assert group["maxReplicas"] >= 1
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert str(limits["nvidia.com/gpu"]) == "8"
        assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head_pod(rc)["containers"][0]["resources"]["limits"]
    assert "request_resources" in RAYCLUSTER.read_text()


def test_head_and_gpu_pods_have_a_memory_backed_dev_shm():
    rc = cluster()
    pods = {"head": head_pod(rc)} | {g["groupName"]: g["template"]["spec"] for g in gpu_groups(rc)}
    for pod_name, pod in pods.items():
        ray_container = pod["containers"][0]
        shm = mounts(ray_container).get("/dev/shm")
        assert shm, f"{pod_name}: no /dev/shm in {ray_container['name']}"
        volume = volumes(pod)[shm["name"]]
        assert volume["emptyDir"]["medium"] == "Memory", pod_name
        assert volume["emptyDir"].get("sizeLimit"), f"{pod_name}: bound /dev/shm"
    # the driver (in prefect-worker) uses the same /dev/shm as the head's object store
    head = head_pod(rc)
    assert mounts(by_name(head, "prefect-worker"))["/dev/shm"]["name"] == \
        mounts(by_name(head, "ray-head"))["/dev/shm"]["name"]


# the Prefect worker beside the Ray head -------------------------------------------------------


def test_the_prefect_worker_is_a_sidecar_of_the_ray_head():
    rc = cluster()
    pod = head_pod(rc)
    # KubeRay puts `ray start` and the token variables into containers[0] only
    assert pod["containers"][0]["name"] == "ray-head"
    worker = by_name(pod, "prefect-worker")
    cmd = command_of(worker)
    assert re.fullmatch(r"prefect worker start --pool rae-pool --work-queue cluster"
                        r"( --type process)?( .*)?", cmd), cmd
    assert "--type process" in cmd
    # one /tmp/ray for both: ray.init(address="auto") reads /tmp/ray/ray_current_cluster and
    # the driver talks to the head's raylet through the sockets of its session directory
    head_tmp = mounts(by_name(pod, "ray-head"))["/tmp/ray"]
    worker_tmp = mounts(worker)["/tmp/ray"]
    assert head_tmp["name"] == worker_tmp["name"] and not worker_tmp.get("subPath")
    assert "emptyDir" in volumes(pod)[head_tmp["name"]]
    # KubeRay mounts its autoscaler's /tmp/ray from the volume of this name
    assert head_tmp["name"] == "ray-logs"
    env = env_of(worker)
    svc = services()
    assert env["PREFECT_API_URL"] == f"http://prefect:{svc['prefect']['spec']['ports'][0]['port']}/api"
    assert env["RAE_PROJECT_DIR"] == "/app"
    assert env["RAY_ADDRESS"] == "auto"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["DO_NOT_TRACK"] == "true" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["RAY_AUTH_MODE"] == "token"
    # the Secret KubeRay generates for a token-auth cluster: named after it, key auth_token
    assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": rc["metadata"]["name"],
                                                      "key": "auth_token"}}


def test_the_flows_get_most_of_the_head_pod():
    pod = head_pod(cluster())
    head = by_name(pod, "ray-head")["resources"]
    worker = by_name(pod, "prefect-worker")["resources"]
    for res in (head, worker):
        assert res["requests"] == res["limits"], "guaranteed: requests equal limits"

    def cpu(q) -> float:
        q = str(q)
        return float(q[:-1]) / 1000 if q.endswith("m") else float(q)

    def gib(q) -> float:
        q = str(q)
        return float(q[:-2]) if q.endswith("Gi") else float(q[:-2]) / 1024

    assert cpu(worker["limits"]["cpu"]) > 4 * cpu(head["limits"]["cpu"])
    assert gib(worker["limits"]["memory"]) > 4 * gib(head["limits"]["memory"])


# services and URLs ----------------------------------------------------------------------------


def test_external_services_are_external_names_on_the_private_zone():
    svc = services()
    assert set(svc) == {"mlflow", "prefect"}
    expected = {"mlflow": ("mlflow.rae.internal", 5000), "prefect": ("prefect.rae.internal", 4200)}
    for name, (host, port) in expected.items():
        spec = svc[name]["spec"]
        assert spec["type"] == "ExternalName" and spec["externalName"] == host
        assert [p["port"] for p in spec["ports"]] == [port]
        assert "selector" not in spec and "clusterIP" not in spec


def test_every_url_names_a_service_of_services_yaml_or_a_private_name():
    ports = {name: {p["port"] for p in s["spec"]["ports"]} for name, s in services().items()}
    found = set()
    for path in manifests():
        for host, port in re.findall(r"https?://([A-Za-z0-9.-]+):(\d+)", path.read_text()):
            found.add((host, int(port)))
            if host.endswith(".rae.internal"):
                continue
            assert host in ports, f"{path.name}: http://{host}:{port} names no Service"
            assert int(port) in ports[host], f"{path.name}: {host} has no port {port}"
    assert {("mlflow", 5000), ("prefect", 4200)} <= found
    for path in manifests():
        assert "svc.cluster.local" not in path.read_text(), path.name


# the RayJob -----------------------------------------------------------------------------------


def rayjob_command() -> tuple[str, list[str]]:
    entrypoint = rayjob()["spec"]["entrypoint"]
    first, rest = entrypoint.split("&&", 1)
    assert first.split() == ["cd", "/app"], entrypoint
    args = shlex.split(rest)
    assert args[0] == "rae", entrypoint
    return entrypoint, args[1:]


def test_the_rayjob_runs_on_the_standing_cluster():
    rc, job = cluster(), rayjob()
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    assert spec["shutdownAfterJobFinishes"] is False, "the cluster is shared"
    assert spec["submissionMode"] == "K8sJobMode"
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["RAY_ADDRESS"] == "auto"
    # the submitter reaches the dashboard's job API through the head Service
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    submitter = job["spec"]["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    senv = env_of(submitter["containers"][0])
    assert senv["RAY_AUTH_MODE"] == "token"
    assert senv["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": rc["metadata"]["name"],
                                                       "key": "auth_token"}}


def test_the_rayjob_entrypoint_is_a_real_run_on_the_shared_paths():
    from flows.cli import parser
    from rae_core.presets import load_config

    entrypoint, args = rayjob_command()
    parsed = parser().parse_args(args)
    assert parsed.command == "run" and parsed.preset == "imagenet256"
    overrides = dict(o.split("=", 1) for o in parsed.overrides)
    assert overrides["data.source"] == "/mnt/shared/datasets/ilsvrc"
    assert {k for k in overrides if k != "data.source"} == {
        "encoder.weights", "decoder.lpips_weights", "decoder.gan.disc_weights",
        "evaluate.inception_weights"}
    for key, value in overrides.items():
        if key != "data.source":
            assert value.startswith("/mnt/shared/weights/"), (key, value)
    cfg = load_config(None, parsed.preset, parsed.overrides)  # every key is a config key
    # the driver (entrypointNumCpus, off the CPU-less head) and the preset's Ray Train
    # workers fit on one GPU pod
    group = gpu_groups(cluster())[0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker + rayjob()["spec"]["entrypointNumCpus"]
    assert rayjob()["spec"]["entrypointNumCpus"] > 0, "else the driver runs in ray-head"
    assert need <= int(limits["cpu"]), (need, limits["cpu"])
    assert cfg.ray.num_workers <= int(limits["nvidia.com/gpu"]) * group["maxReplicas"]


# exposure -------------------------------------------------------------------------------------


def walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def test_nothing_is_exposed_outside_the_cluster():
    for path in manifests():
        for doc in load_all(path):
            assert doc["kind"] not in {"Ingress", "Gateway", "HTTPRoute", "Route"}, path.name
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") in {"ClusterIP", "ExternalName"}
            for where, key, value in walk(doc):
                assert key not in {"hostPort", "nodePort", "externalIPs"}, f"{path.name}{where}"
                if key in {"hostNetwork", "hostPID", "hostIPC", "enableIngress"}:
                    assert value is not True, f"{path.name}{where}"
                if key == "serviceType":
                    assert value == "ClusterIP", f"{path.name}{where}"
        text = path.read_text()
        for word in ("LoadBalancer", "NodePort", "hostNetwork: true"):
            assert word not in text, f"{path.name}: {word}"
    assert cluster()["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"

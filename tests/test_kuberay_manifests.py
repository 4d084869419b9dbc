"""The batch service's KubeRay manifests (deploy/kuberay/), checked offline.

No Kubernetes or KubeRay operator runs here, and the repo vendors no KubeRay
CRD schema. So: the standard objects, and every pod template the CRDs carry,
are validated against the Kubernetes schema; the CRDs' own fields are
checked against the field names of KubeRay's API reference (v1.7); and the
settings the service, its drivers and the model actors share (Ray's address
and token, the service key, the model cache) are checked to agree across the
files and with the service's code.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy/kuberay"
RAY_TOKEN_SECRET = "mlmesh-batch-ray-token"
SERVICE_KEY_SECRET = "mlmesh-batch-service-key"

# Field names of KubeRay's ray.io/v1 API reference (v1.7), for the parts of
# the CRDs that are KubeRay's own (pod templates are Kubernetes' and are
# checked against its schema).
RAYCLUSTER_SPEC = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
    "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
    "workerGroupSpecs",
}  # fmt: skip
AUTH_OPTIONS = {"enableK8sTokenAuth", "secretName", "mode"}
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
    "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args",
}  # fmt: skip
HEAD_GROUP = {
    "template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
    "rayStartParams", "serviceType",
}  # fmt: skip
WORKER_GROUP = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy",
    "numOfHosts",
}  # fmt: skip
WORKER_GROUP_REQUIRED = {"groupName", "template", "rayStartParams", "minReplicas", "maxReplicas"}
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs(name) if d["kind"] == kind]
    return doc


def cluster() -> dict[str, Any]:
    return one("raycluster.yaml", "RayCluster")


def deployment() -> dict[str, Any]:
    """The batch service's workload: a StatefulSet of one (Envoy's writer is
    its pod 0, batch-0.batch)."""
    return one("batch-service.yaml", "StatefulSet")


def service_config() -> dict[str, str]:
    (config,) = [
        d
        for d in docs("batch-service.yaml")
        if d["kind"] == "ConfigMap"
        and {"configMapRef": {"name": d["metadata"]["name"]}} in batch_container()["envFrom"]
    ]
    return dict(config["data"])


def rayjob() -> dict[str, Any]:
    return one("rayjob.yaml", "RayJob")


def pod_templates() -> dict[str, dict[str, Any]]:
    """Every pod these files make, by a name for messages."""
    spec = cluster()["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]}
    for group in spec["workerGroupSpecs"]:
        pods[f"worker {group['groupName']}"] = group["template"]
    pods["batch service"] = deployment()["spec"]["template"]
    pods["rayjob submitter"] = rayjob()["spec"]["submitterPodTemplate"]
    return pods


def ray_containers() -> dict[str, dict[str, Any]]:
    """The containers that are Ray nodes or Ray clients (all but the service's)."""
    spec = cluster()["spec"]
    found = {"head": spec["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in spec["workerGroupSpecs"]:
        found[f"worker {group['groupName']}"] = group["template"]["spec"]["containers"][0]
    pod = deployment()["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "ray-node"]
    found["batch ray-node sidecar"] = sidecar
    found["rayjob submitter"] = rayjob()["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    return found


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


def env(container: dict[str, Any]) -> dict[str, str]:
    """A container's plain values: its ConfigMap's (the batch service's) and its own."""
    values = service_config() if container.get("envFrom") else {}
    values.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return values


def batch_container() -> dict[str, Any]:
    (container,) = deployment()["spec"]["template"]["spec"]["containers"]
    return container


def mount_of(pod_spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict, dict]:
    """The volume mount holding ``path`` in ``container`` and its volume."""
    target = PurePosixPath(path)
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if target == PurePosixPath(m["mountPath"])
        or PurePosixPath(m["mountPath"]) in target.parents
    ]
    assert mounts, f"{container['name']}: nothing mounted at {path}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))  # the innermost
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def secret_file(pod_spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret, key) of the file ``path`` in ``container``."""
    mount, volume = mount_of(pod_spec, container, path)
    if "subPath" in mount:
        assert mount["mountPath"] == path
        key = mount["subPath"]
    else:
        key = str(PurePosixPath(path).relative_to(mount["mountPath"]))
    return volume["secret"]["secretName"], key


# --- Kubernetes' own schema -------------------------------------------------


def test_the_standard_objects_validate_against_the_kubernetes_schema():
    validate = pytest.importorskip("kubernetes_validate")
    for name in ("batch-service.yaml", "rayjob.yaml", "raycluster.yaml"):
        for doc in docs(name):
            if not doc["apiVersion"].startswith("ray.io/"):
                validate.validate(doc, "1.37.0", strict=True)


def test_the_pod_templates_inside_the_crds_validate_against_the_kubernetes_schema():
    """KubeRay's CRDs embed core/v1 PodTemplateSpecs: validated as PodTemplates,
    and the autoscaler's container settings as a container of the head pod."""
    validate = pytest.importorskip("kubernetes_validate")
    head = cluster()["spec"]["headGroupSpec"]["template"]
    autoscaler = {
        "name": "autoscaler",
        "image": head["spec"]["containers"][0]["image"],
        **cluster()["spec"]["autoscalerOptions"],
    }
    for field in ("idleTimeoutSeconds", "upscalingMode", "version"):
        autoscaler.pop(field, None)  # KubeRay's, not the container's
    templates = {
        **pod_templates(),
        "autoscaler": {**head, "spec": {**head["spec"], "containers": [autoscaler]}},
    }
    for name, template in templates.items():
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name.replace(" ", "-")},
            "template": template,
        }
        validate.validate(wrapped, "1.37.0", strict=True)


def test_the_kustomization_builds_the_cluster_and_the_service():
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"raycluster.yaml", "batch-service.yaml"}
    for name in kustomization["resources"]:
        for doc in docs(name):
            assert doc["metadata"]["namespace"] == kustomization["namespace"]
    # the example RayJob is applied on its own, but in the same namespace
    assert {d["metadata"]["namespace"] for d in docs("rayjob.yaml")} == {kustomization["namespace"]}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize build is not checked")
    built = subprocess.run(
        [kubectl, "kustomize", str(KUBERAY)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(built) if d)
    assert kinds == [
        "ConfigMap",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "RayCluster",
        "Service",
        "StatefulSet",
    ]


# --- KubeRay's fields, without its schema -------------------------------------


def test_the_raycluster_names_only_kuberay_fields():
    doc = cluster()
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["metadata"]["name"] == "mlmesh-batch"
    spec = doc["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert set(spec["authOptions"]) <= AUTH_OPTIONS
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER_OPTIONS
    assert spec["autoscalerOptions"]["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and {"template", "rayStartParams"} <= set(head)
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP
        assert set(group) >= WORKER_GROUP_REQUIRED, WORKER_GROUP_REQUIRED - set(group)
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"]  # the autoscaler has room
    for params in [
        head["rayStartParams"],
        *(g["rayStartParams"] for g in spec["workerGroupSpecs"]),
    ]:
        # map[string]string: an unquoted number would be refused by the CRD
        assert all(isinstance(v, str) for v in params.values()), params
    assert spec["enableInTreeAutoscaling"] is True


def test_the_cluster_runs_the_ray_the_batch_service_pins():
    pyproject = (ROOT / "services/batch/pyproject.toml").read_text()
    (line,) = [line for line in pyproject.splitlines() if '"ray[' in line]
    version = line.split("==")[1].strip('",')
    assert cluster()["spec"]["rayVersion"] == version
    images = {
        c["image"]
        for name, pod in pod_templates().items()
        for c in all_containers(pod)
        if (name, c["name"]) != ("batch service", "batch")
    }
    # one Ray image on every Ray node and client: the head, the workers, the
    # drivers' sidecar node and the submitter share Ray and Python; the
    # service runs the batch image, built FROM the same services
    # environment (deploy/docker). Tags come from deploy/k8s's overlays.
    assert images == {"mlmesh/ray"}, images
    assert batch_container()["image"] == "mlmesh/batch"


def test_the_rayjob_runs_the_driver_on_the_cluster():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["submissionMode"] in SUBMISSION_MODES
    # on the existing cluster, which it must not create or delete
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster()["metadata"]["name"]}
    assert "rayClusterSpec" not in spec and not spec.get("shutdownAfterJobFinishes")
    # one plain command: KubeRay pastes it into a shell line of its own
    entrypoint = spec["entrypoint"]
    assert shlex.split(entrypoint) == ["python", "-m", "mlmesh_batch.driver", "."]
    assert not set(entrypoint) & set(";&|$`<>()\\\"'")


def test_the_rayjob_driver_json_is_the_drivers_own_format():
    from mlmesh_batch.driver import DriverConfig

    (config_map,) = [d for d in docs("rayjob.yaml") if d["kind"] == "ConfigMap"]
    config = DriverConfig.from_json(config_map["data"]["driver.json"])
    spec = rayjob()["spec"]
    submitter = spec["submitterPodTemplate"]["spec"]
    # the folder `ray job submit` uploads as working_dir is the ConfigMap's
    working_dir = yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    mount, volume = mount_of(submitter, submitter["containers"][0], working_dir)
    assert mount["mountPath"] == working_dir
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    # the driver runs on the head, inside a Ray job
    assert config.ray_address == "auto"
    # the paths the model actors use exist on the workers
    service = env(batch_container())
    assert config.cache_root == f"{service['MLMESH_BATCH_ROOT']}/models"
    assert config.service_key_file == service["MLMESH_BATCH_SERVICE_KEY_FILE"]
    assert config.registry_target == service["MLMESH_BATCH_REGISTRY_TARGET"]
    assert str(config.cores) == service["MLMESH_BATCH_CORES"]
    for uri in (config.plan.input_uri, config.plan.output_uri, config.plan.error_uri):
        assert uri.split("://")[0] in config.allowed_protocols, uri
    assert not config.plan.online  # no caller key to give it


# --- security ------------------------------------------------------------------


def test_every_container_runs_as_non_root_with_requests_and_limits():
    for name, pod in pod_templates().items():
        security = pod["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, name
        for container in all_containers(pod):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
    autoscaler = cluster()["spec"]["autoscalerOptions"]
    assert autoscaler["securityContext"]["runAsNonRoot"] is True
    assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False


def test_every_volume_mount_names_a_volume_of_its_pod():
    for name, pod in pod_templates().items():
        volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
        for container in all_containers(pod):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{container['name']}: {mount['name']}"
    head_volumes = {
        v["name"] for v in cluster()["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    }
    for mount in cluster()["spec"]["autoscalerOptions"]["volumeMounts"]:
        assert mount["name"] in head_volumes  # the autoscaler runs in the head pod


def test_every_ray_process_reads_one_token_from_one_secret():
    """Token auth on every node and client, from the same Secret at the same
    path; the operator is told the same Secret; the service hands the same
    file to its drivers."""
    spec = cluster()["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET}
    pods = {
        "head": spec["headGroupSpec"]["template"]["spec"],
        **{f"worker {g['groupName']}": g["template"]["spec"] for g in spec["workerGroupSpecs"]},
        "batch ray-node sidecar": deployment()["spec"]["template"]["spec"],
        "rayjob submitter": rayjob()["spec"]["submitterPodTemplate"]["spec"],
    }
    paths = set()
    for name, container in ray_containers().items():
        variables = env(container)
        assert variables["RAY_AUTH_MODE"] == "token", name
        path = variables["RAY_AUTH_TOKEN_PATH"]
        paths.add(path)
        assert secret_file(pods[name], container, path) == (RAY_TOKEN_SECRET, "auth_token"), name
    (path,) = paths
    autoscaler = spec["autoscalerOptions"]
    assert env(autoscaler) == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": path}
    assert secret_file(pods["head"], autoscaler, path) == (RAY_TOKEN_SECRET, "auth_token")
    service = batch_container()
    assert env(service)["MLMESH_BATCH_RAY_TOKEN_FILE"] == path
    assert secret_file(pods["batch ray-node sidecar"], service, path) == (
        RAY_TOKEN_SECRET,
        "auth_token",
    )


def test_the_service_key_and_the_model_cache_are_at_the_same_paths_everywhere():
    """The service writes both paths into each driver.json; the model actors
    on the workers (and a RayJob's driver on the head) use them as given."""
    service = env(batch_container())
    key_path = service["MLMESH_BATCH_SERVICE_KEY_FILE"]
    cache = f"{service['MLMESH_BATCH_ROOT']}/models"
    service_pod = deployment()["spec"]["template"]["spec"]
    places = [(service_pod, batch_container())]
    spec = cluster()["spec"]
    for template in [
        spec["headGroupSpec"]["template"],
        *(g["template"] for g in spec["workerGroupSpecs"]),
    ]:
        places.append((template["spec"], template["spec"]["containers"][0]))
    for pod_spec, container in places:
        assert secret_file(pod_spec, container, key_path) == (SERVICE_KEY_SECRET, "service.key")
        mount, _ = mount_of(pod_spec, container, key_path)
        # a plain file: Path.resolve() (jobs.py) leaves the path as it is,
        # where a Secret volume's ..data link would lead into this pod only
        assert "subPath" in mount, container["name"]
        cache_mount, cache_volume = mount_of(pod_spec, container, cache)
        assert not cache_mount.get("readOnly"), container["name"]
        assert "emptyDir" in cache_volume or "persistentVolumeClaim" in cache_volume


# --- the service ---------------------------------------------------------------


def test_the_service_settings_are_batch_settings_and_point_at_the_cluster(monkeypatch):
    import os

    from mlmesh_batch.config import BatchSettings

    container = batch_container()
    names = {e["name"] for e in container["env"]} | set(service_config())
    names = {n for n in names if n.startswith("MLMESH_BATCH_")}
    unknown = {
        n
        for n in names
        if n.removeprefix("MLMESH_BATCH_").lower() not in BatchSettings.model_fields
    }
    assert not unknown, unknown
    for name in [n for n in os.environ if n.startswith("MLMESH_BATCH_")]:
        monkeypatch.delenv(name)
    for name, value in env(container).items():
        monkeypatch.setenv(name, value)
    (database,) = [e for e in container["env"] if e["name"] == "MLMESH_BATCH_DATABASE_URL"]
    assert database["valueFrom"]["secretKeyRef"]["key"] == "url"
    settings = BatchSettings()
    head = cluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (gcs_port,) = [p["containerPort"] for p in head["ports"] if p["name"] == "gcs-server"]
    # KubeRay names the head Service <cluster>-head-svc
    assert settings.ray_address == f"{cluster()['metadata']['name']}-head-svc:{gcs_port}"
    assert settings.host == "0.0.0.0"
    assert str(settings.root).startswith("/")  # resolved paths go into driver.json
    assert settings.protocols() == ["s3"]
    (workers,) = cluster()["spec"]["workerGroupSpecs"]
    worker = workers["template"]["spec"]["containers"][0]
    assert str(settings.cores) == str(worker["resources"]["limits"]["cpu"])
    assert settings.registry_target and settings.gateway_target


def test_one_service_instance_owns_the_jobs():
    spec = deployment()["spec"]
    assert spec["replicas"] == 1
    # a StatefulSet never runs two pods of one ordinal: never two at once
    assert deployment()["kind"] == "StatefulSet" and spec["serviceName"] == "batch"
    mounts = {m["mountPath"]: m["name"] for m in batch_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    root = env(batch_container())["MLMESH_BATCH_ROOT"]
    assert "persistentVolumeClaim" in volumes[mounts[root]]


def test_the_drivers_have_a_ray_node_in_their_pod():
    """ray.init(address) attaches a driver to a raylet process on its own
    machine: the sidecar is that node, visible to the drivers."""
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "ray-node"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar, started first
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/api/local_raylet_healthz"
    command = sidecar["command"]
    assert command[:2] == ["ray", "start"] and "--block" in command
    assert f"--address={env(batch_container())['MLMESH_BATCH_RAY_ADDRESS']}" in command
    assert "--num-cpus=0" in command  # no task or actor lands in the service's pod
    # the raylet's sockets are where the drivers look
    shared = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    service = {m["mountPath"]: m["name"] for m in batch_container()["volumeMounts"]}
    assert shared["/tmp/ray"] == service["/tmp/ray"]


def test_the_service_serves_grpc_health_on_its_port():
    from mlmesh_batch.registration import REGISTRATION

    container = batch_container()
    (port,) = [p for p in container["ports"] if p["name"] == "grpc"]
    assert env(container)["MLMESH_BATCH_PORT"] == str(port["containerPort"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"], probe
    assert container["readinessProbe"]["grpc"]["service"] == REGISTRATION.service_names()[0]
    service = one("batch-service.yaml", "Service")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert service_port["targetPort"] == "grpc"
    assert service["metadata"]["name"] == REGISTRATION.name
    # headless, so that Envoy's writer (batch-0.batch) resolves
    assert service["spec"]["clusterIP"] == "None"


def test_the_ray_pods_and_the_service_are_in_the_mesh():
    """The Ray pods reach the registry (model downloads) and the batch pod's
    raylet, and each other; the NetworkPolicies name them by KubeRay's label."""
    for name, pod in pod_templates().items():
        assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mlmesh", name
    policies = {
        p["metadata"]["name"]: p
        for p in yaml.safe_load_all((ROOT / "deploy/network/network-policies.yaml").read_text())
    }
    ray = {"podSelector": {"matchLabels": {"ray.io/cluster": cluster()["metadata"]["name"]}}}
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    batch = policies["batch-ray"]
    assert batch["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert batch["spec"]["ingress"] == [{"from": [ray]}]
    assert ray in policies["registry-from-its-callers"]["spec"]["ingress"][0]["from"]
    assert policies["ray-cluster"]["spec"]["podSelector"] == ray["podSelector"]

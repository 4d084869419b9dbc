"""Deployment files are checked offline (no cluster runs here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_kserve_inference_service_uses_the_triton_runtime():
    service = yaml.safe_load((ROOT / "deploy/kserve/triton-runtime.yaml").read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["protocolVersion"] == "v2"
    assert "--model-control-mode=explicit" in model["args"]
    assert model["storageUri"].startswith(("s3://", "gs://", "pvc://"))


def network_policies() -> dict[str, dict]:
    docs = yaml.safe_load_all((ROOT / "deploy/network/network-policies.yaml").read_text())
    return {doc["metadata"]["name"]: doc for doc in docs}


def test_network_policies_validate_against_the_kubernetes_schema():
    validate = pytest.importorskip("kubernetes_validate")
    for policy in network_policies().values():
        validate.validate(policy, "1.37.0", strict=True)


def test_only_the_gateway_deployer_and_vectors_reach_triton_and_only_over_grpc():
    kserve = yaml.safe_load((ROOT / "deploy/kserve/triton-runtime.yaml").read_text())
    (grpc_port,) = [p["containerPort"] for p in kserve["spec"]["predictor"]["model"]["ports"]]
    policies = [
        p
        for p in network_policies().values()
        if p["spec"]["podSelector"].get("matchLabels", {}).get("serving.kserve.io/inferenceservice")
        == kserve["metadata"]["name"]
    ]
    assert policies, "no NetworkPolicy selects the Triton predictor pods"
    for policy in policies:
        assert policy["metadata"]["namespace"] == kserve["metadata"]["namespace"]
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            # every rule names its peers (an absent `from` admits everyone) ...
            peers = rule["from"]
            # the gateway (inference), the deployer (model control), vectors
            # (embeddings: MLMESH_VECTORS_TRITON_TARGET)
            assert {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in peers} <= {
                "gateway",
                "deployer",
                "vectors",
            }
            assert all(set(p) == {"podSelector"} for p in peers)  # no ipBlock, no namespaces
            # ... and admits gRPC only: HTTP (8080) and metrics (8002) stay closed
            assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", grpc_port)]


def test_envoy_admin_is_never_exposed():
    envoy = yaml.safe_load((ROOT / "deploy/envoy/envoy.yaml").read_text())
    admin_port = envoy["admin"]["address"]["socket_address"]["port_value"]
    assert envoy["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (listener,) = envoy["static_resources"]["listeners"]
    listener_port = listener["address"]["socket_address"]["port_value"]
    policy = next(
        p
        for p in network_policies().values()
        if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "envoy"
    )
    admitted = [(p["protocol"], p["port"]) for r in policy["spec"]["ingress"] for p in r["ports"]]
    assert admitted == [("TCP", listener_port)]
    # No manifest under deploy/ publishes the admin port (Service or container port).
    for path in (ROOT / "deploy").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or path.name == "envoy.yaml":
                continue
            text = yaml.safe_dump(doc)
            assert f"port: {admin_port}\n" not in text, path
            assert f"containerPort: {admin_port}\n" not in text, path
            assert f"targetPort: {admin_port}\n" not in text, path


def test_every_chassis_service_takes_traffic_only_from_named_pods_of_the_mesh():
    """Default deny, then one policy per chassis service that names its
    callers (Envoy and the services that call it) by pod label; the exact
    table is in tests/test_k8s_manifests.py."""
    from mlmesh_runner.catalog import CATALOG

    policies = network_policies()
    deny = policies["default-deny-ingress"]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    chassis = {s.name for s in CATALOG if s.port_discovery == "port-file"}
    for name in chassis:
        policy = policies[f"{name}-from-its-callers"]
        assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": name}}
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule["from"] and rule["ports"], name  # named peers, named ports
            assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "envoy"}}} in rule[
                "from"
            ]
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, name  # this namespace, no ipBlock


def test_the_flink_deployment_runs_the_streaming_job_exactly_once():
    """The FlinkDeployment runs the job.py the local cluster runs, with the
    local cluster's exactly-once settings, and resumes from its last
    checkpoint on upgrade."""
    from mlmesh_features.streaming import job

    docs = list(yaml.safe_load_all((ROOT / "deploy/flink/features-stream.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "FlinkDeployment"]
    (spec_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert deployment["apiVersion"] == "flink.apache.org/v1beta1"
    spec = deployment["spec"]
    flink = spec["flinkConfiguration"]
    assert flink["execution.checkpointing.mode"] == "EXACTLY_ONCE"
    assert flink["execution.checkpointing.externalized-checkpoint-retention"] == (
        "RETAIN_ON_CANCELLATION"
    )
    assert flink["execution.checkpointing.dir"].startswith("s3://")
    assert flink["restart-strategy.type"] == "fixed-delay"
    assert flink["table.local-time-zone"] == "UTC"  # the windows' epoch grid
    assert spec["job"]["upgradeMode"] == "last-state"
    assert spec["job"]["entryClass"] == "org.apache.flink.client.python.PythonDriver"
    args = spec["job"]["args"]
    assert args[args.index("-py") + 1].endswith("/" + Path(job.__file__).name)
    # the spec the job reads is the ConfigMap's, mounted where the args say
    (mount,) = spec["podTemplate"]["spec"]["containers"][0]["volumeMounts"]
    assert args[-1] == f"{mount['mountPath']}/job.json"
    assert job.statements(json.loads(spec_map["data"]["job.json"])) == ([], [])
    # the Flink version the jar names is the one the local environment pins
    pins = (ROOT / "services/features/flink-requirements.txt").read_text()
    version = spec["job"]["jarURI"].rsplit("-", 1)[1].removesuffix(".jar")
    assert f"apache-flink=={version}" in pins


def test_kafka_event_log_topics_are_replicated_and_acl_scoped():
    docs = list(yaml.safe_load_all((ROOT / "deploy/kafka/events.yaml").read_text()))
    kinds = {d["kind"] for d in docs}
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"} <= kinds
    for topic in (d for d in docs if d["kind"] == "KafkaTopic"):
        assert topic["metadata"]["name"].startswith("mlmesh.events.")
        assert topic["spec"]["replicas"] >= 3
        assert int(topic["spec"]["config"]["min.insync.replicas"]) >= 2
    users = {d["metadata"]["name"]: d for d in docs if d["kind"] == "KafkaUser"}
    writes = {
        name: {op for acl in u["spec"]["authorization"]["acls"] for op in acl["operations"]}
        for name, u in users.items()
    }
    assert "Write" in writes["features"] and "Write" not in writes["features-stream"]

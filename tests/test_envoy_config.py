"""Envoy's configuration: valid for the real binary, retries only where safe,
hardened as an edge proxy, no external authorization."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from mlmesh.registry.v1 import registry_service_pb2
from mlmesh_runner.catalog import CATALOG
from mlmesh_runner.envoy import Upstream, read_only_methods, render
from mlmesh_runner.render_envoy import deployment_config

ROOT = Path(__file__).resolve().parents[1]
ENVOY = str(Path(sys.executable).with_name("envoy"))
REGISTRY = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]


def validate(config: dict, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def mesh_upstreams() -> list[Upstream]:
    """Every routed service of the catalog, as the local runner renders them."""
    return [
        Upstream(
            spec.name,
            spec.services(),
            [("127.0.0.1", 50051 + n)],
            ("127.0.0.1", 50051 + n) if spec.single_writer else None,
            http_prefixes=spec.http_routes,
            http_endpoints=[("127.0.0.1", 8000 + n)] if spec.http_routes else [],
        )
        for n, spec in enumerate(s for s in CATALOG if s.routed)
    ]


def connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    assert manager["name"] == "envoy.filters.network.http_connection_manager"
    return manager["typed_config"]


def routes_of(config: dict[str, Any]) -> list[dict[str, Any]]:
    (host,) = connection_manager(config)["route_config"]["virtual_hosts"]
    return host["routes"]


def test_rendered_config_validates_with_and_without_tracing(tmp_path):
    upstreams = [Upstream("registry", [REGISTRY], [("127.0.0.1", 50051)])]
    validate(render(upstreams), tmp_path)
    validate(render(upstreams, otlp_endpoint=("127.0.0.1", 4317)), tmp_path)
    validate(render(mesh_upstreams(), otlp_endpoint=("127.0.0.1", 4317)), tmp_path)


def test_only_no_side_effects_methods_are_retried():
    config = render([Upstream("registry", [REGISTRY], [("127.0.0.1", 50051)])])
    routes = routes_of(config)
    retried = {r["match"]["path"] for r in routes if "retry_policy" in r["route"]}
    assert retried == set(read_only_methods(REGISTRY))
    assert "/mlmesh.registry.v1.RegistryService/ResolveModelReference" in retried
    for mutation in ("UploadModelVersion", "SetAlias", "CreateModel", "RollbackAlias"):
        assert f"/mlmesh.registry.v1.RegistryService/{mutation}" not in retried
    # everything else of the service goes to its cluster without retries
    prefix = next(
        r for r in routes if r["match"].get("prefix") == "/mlmesh.registry.v1.RegistryService/"
    )
    assert prefix["route"]["cluster"] == "registry" and "retry_policy" not in prefix["route"]


def test_committed_deployment_config_is_current_and_valid(tmp_path):
    committed = (ROOT / "deploy/envoy/envoy.yaml").read_text()
    assert committed == deployment_config(), (
        "deploy/envoy/envoy.yaml is stale: run `python -m mlmesh_runner.render_envoy`"
    )
    validate(yaml.safe_load(committed), tmp_path)


def test_no_external_authorization_anywhere():
    """Services authenticate every call in process; Envoy only routes."""
    for config in (render(mesh_upstreams()), yaml.safe_load(deployment_config())):
        assert "ext_authz" not in json.dumps(config)
        filters = [f["name"] for f in connection_manager(config)["http_filters"]]
        assert filters == ["envoy.filters.http.router"]
        assert all("typed_per_filter_config" not in r for r in routes_of(config))
        clusters = {c["name"] for c in config["static_resources"]["clusters"]}
        assert clusters == {s.name for s in CATALOG if s.routed} | {
            f"{s.name}_primary" for s in CATALOG if s.routed and s.single_writer
        } | {f"{s.name}_http" for s in CATALOG if s.routed and s.http_routes}


def test_the_openai_surface_is_routed_as_plain_http_without_retries():
    """/v1/ goes to the gateway's HTTP port (HTTP/1.1, checked on /healthz):
    never retried (a completion is not idempotent), never cut by a timeout."""
    for config in (render(mesh_upstreams()), yaml.safe_load(deployment_config())):
        route = next(r for r in routes_of(config) if r["match"].get("prefix") == "/v1/")
        assert "grpc" not in route["match"]
        assert route["route"] == {"cluster": "gateway_http", "timeout": "0s"}
        cluster = next(
            c for c in config["static_resources"]["clusters"] if c["name"] == "gateway_http"
        )
        assert cluster["health_checks"][0]["http_health_check"] == {"path": "/healthz"}
        assert "typed_extension_protocol_options" not in cluster  # HTTP/1.1 upstream


def test_a_single_writer_takes_the_writes_and_every_replica_the_reads():
    """The vector service's read replicas: Envoy sends its writing methods to
    the primary's cluster only, its reads to every instance."""
    from mlmesh.vectors.v1 import vectors_service_pb2

    vectors = vectors_service_pb2.DESCRIPTOR.services_by_name["VectorService"]
    replicas = [("127.0.0.1", 7000), ("127.0.0.1", 7001), ("127.0.0.1", 7002)]
    config = render([Upstream("vectors", [vectors], replicas, replicas[0])])
    by_path = {r["match"].get("path") or r["match"].get("prefix"): r for r in routes_of(config)}
    assert by_path["/mlmesh.vectors.v1.VectorService/Search"]["route"]["cluster"] == "vectors"
    assert by_path["/mlmesh.vectors.v1.VectorService/"]["route"]["cluster"] == "vectors_primary"
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    endpoints = {
        name: [
            e["endpoint"]["address"]["socket_address"]["port_value"]
            for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        ]
        for name, cluster in clusters.items()
    }
    assert endpoints == {"vectors": [7000, 7001, 7002], "vectors_primary": [7000]}


def test_edge_proxy_hardening():
    config = render(mesh_upstreams(), otlp_endpoint=("127.0.0.1", 4317))
    overload = config["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] > 0
    connections = monitors["envoy.resource_monitors.global_downstream_max_connections"]
    assert connections["max_active_downstream_connections"] > 0
    actions = {a["name"]: a["triggers"] for a in overload["actions"]}
    for action in (
        "envoy.overload_actions.shrink_heap",
        "envoy.overload_actions.stop_accepting_requests",
    ):
        assert actions[action][0]["name"] == "envoy.resource_monitors.fixed_heap"
    assert (
        actions["envoy.overload_actions.shrink_heap"][0]["threshold"]["value"]
        < actions["envoy.overload_actions.stop_accepting_requests"][0]["threshold"]["value"]
    )

    (listener,) = config["static_resources"]["listeners"]
    assert listener["per_connection_buffer_limit_bytes"] == 32 * 1024
    clusters = config["static_resources"]["clusters"]
    assert {c["name"] for c in clusters} >= {"otel_collector", "registry", "llm", "gateway"}
    for cluster in clusters:
        assert cluster["per_connection_buffer_limit_bytes"] == 32 * 1024, cluster["name"]
        (thresholds,) = cluster["circuit_breakers"]["thresholds"]
        assert thresholds["priority"] == "DEFAULT"
        for limit in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            assert thresholds[limit] > 3, (cluster["name"], limit)
        # Long streams each hold a request slot: more than Envoy's default 1024.
        assert thresholds["max_requests"] > 1024

    manager = connection_manager(config)
    assert manager["use_remote_address"] is True
    assert manager["xff_num_trusted_hops"] == 0
    assert manager["normalize_path"] is True
    assert manager["merge_slashes"] is True
    assert manager["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    common = manager["common_http_protocol_options"]
    assert common["headers_with_underscores_action"] == "REJECT_REQUEST"
    assert common["idle_timeout"] == "3600s"
    http2 = manager["http2_protocol_options"]
    assert http2["max_concurrent_streams"] == 100
    assert 64 * 1024 <= http2["initial_stream_window_size"] <= 1024 * 1024
    assert http2["initial_stream_window_size"] <= http2["initial_connection_window_size"]
    assert http2["initial_connection_window_size"] <= 4 * 1024 * 1024
    assert manager["request_headers_timeout"] == "10s"
    assert manager["stream_idle_timeout"] == "300s"
    removed = manager["route_config"]["request_headers_to_remove"]
    assert {"x-mlmesh-actor", "x-mlmesh-key-id"} <= set(removed)


def test_long_streams_are_not_cut_by_envoy():
    """Token streams, uploads and watches live as long as their client's deadline."""
    config = render(mesh_upstreams())
    manager = connection_manager(config)
    assert manager["request_timeout"] == "0s"  # an upload takes as long as it takes
    routes = routes_of(config)
    for route in routes:
        assert route["route"]["timeout"] == "0s", route["name"]
        if not route["name"].startswith("gateway_http:"):  # gRPC routes
            assert route["route"]["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
    by_name = {r["name"]: r["route"] for r in routes}
    # A watch may be silent for hours: no idle timeout on it.
    for method in ("WatchEvents", "DownloadModelVersion"):
        assert by_name[f"/mlmesh.registry.v1.RegistryService/{method}"]["idle_timeout"] == "0s"
    # Everything else keeps the connection manager's stream idle timeout.
    assert "idle_timeout" not in by_name["mlmesh.llm.v1.LlmService"]
    assert "idle_timeout" not in by_name["mlmesh.registry.v1.RegistryService"]


def test_admin_on_loopback_and_local_listener_on_loopback():
    local = render(mesh_upstreams())
    deployed = yaml.safe_load(deployment_config())
    for config in (local, deployed):
        assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (listener,) = local["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["address"] == "127.0.0.1"
    # The deployment listens on its container's interfaces; admin stays loopback.
    (listener,) = deployed["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["address"] == "0.0.0.0"
    assert "must never be exposed" in deployment_config()

"""Envoy's configuration: valid for the real binary, retries only where safe,
hardened as an edge proxy, no external authorization."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from mlmesh.registry.v1 import registry_service_pb2
from mlmesh.review.v1 import review_pb2, review_service_pb2_grpc
from mlmesh.review.v1 import review_service_pb2 as review_rpc
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
        assert filters == ["envoy.filters.http.grpc_web", "envoy.filters.http.router"]
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


def test_grpc_web_reaches_every_service_on_its_own_route():
    """The grpc_web filter turns a browser's gRPC-Web call into gRPC after the
    route was chosen, so each gRPC service has one route matching the
    gRPC-Web content types (whole), to the cluster its writes go to, never
    retried; the gRPC routes still take gRPC alone."""
    import re

    for config in (render(mesh_upstreams()), yaml.safe_load(deployment_config())):
        routes = routes_of(config)
        web = {r["match"]["prefix"]: r for r in routes if r["name"].endswith(":grpc-web")}
        services = {
            f"/{service.full_name}/": spec
            for spec in CATALOG
            if spec.routed
            for service in spec.services()
        }
        assert set(web) == set(services)
        for prefix, route in web.items():
            spec = services[prefix]
            writer = f"{spec.name}_primary" if spec.single_writer else spec.name
            assert route["route"]["cluster"] == writer
            assert "retry_policy" not in route["route"] and "grpc" not in route["match"]
            (header,) = route["match"]["headers"]
            assert header["name"] == "content-type"
            pattern = re.compile(header["string_match"]["safe_regex"]["regex"])
            for bridged in ("application/grpc-web", "application/grpc-web+proto"):
                assert pattern.fullmatch(bridged)
            for other in ("application/grpc", "application/grpc-web+json", "text/plain"):
                assert not pattern.fullmatch(other)
        grpc_routes = [r for r in routes if r["match"].get("prefix", "").startswith("/mlmesh.")]
        assert all("grpc" in r["match"] for r in grpc_routes if r not in web.values())


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
        if not route["route"]["cluster"].endswith("_http"):  # gRPC and gRPC-Web routes
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


# ---- gRPC-Web through the real Envoy ------------------------------------------


def _grpc_web_post(url: str, message: bytes, headers: dict[str, str]):
    """(HTTP status, headers, body) of one gRPC-Web call (HTTP/1.1, as a browser)."""
    frame = b"\x00" + struct.pack(">I", len(message)) + message
    request = urllib.request.Request(
        url,
        data=frame,
        method="POST",
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _read_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def _frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """gRPC-Web response frames: the messages, and the trailers frame's fields."""
    messages, trailers, at = [], {}, 0
    while at < len(body):
        flags, length = body[at], struct.unpack(">I", body[at + 1 : at + 5])[0]
        data = body[at + 5 : at + 5 + length]
        at += 5 + length
        if flags & 0x80:
            for line in data.decode().split("\r\n"):
                if line:
                    name, _, value = line.partition(":")
                    trailers[name] = value
        else:
            messages.append(data)
    return messages, trailers


async def test_grpc_web_is_bridged_with_the_callers_authorization(tmp_path):
    """A browser's gRPC-Web call reaches the service as gRPC through the real
    Envoy, with its ``authorization`` header as metadata (the service checks
    the key) and the mesh-only headers stripped; the answer comes back framed
    with a trailers frame, an error as gRPC status headers with its
    google.rpc details; plain gRPC through the same Envoy is unchanged."""
    review = review_rpc.DESCRIPTOR.services_by_name["ReviewService"]

    class EchoReview(review_service_pb2_grpc.ReviewServiceServicer):
        """Answers with what the call carried (a test double of the service)."""

        async def ListItems(self, request, context):
            metadata = dict(context.invocation_metadata())
            item = review_pb2.Item(
                name="items/echo",
                inputs=metadata.get("authorization", ""),
                primary_output=metadata.get("x-mlmesh-actor", "<stripped>"),
                model=request.model,
            )
            return review_rpc.ListItemsResponse(items=[item], next_page_token="next")

        async def ClaimItem(self, request, context):
            info = error_details_pb2.ErrorInfo(reason="ITEM_CLAIMED", domain="mlmesh.review")
            status = status_pb2.Status(code=grpc.StatusCode.FAILED_PRECONDITION.value[0])
            status.message = "held by <José>"
            status.details.add().Pack(info)
            await context.abort_with_status(rpc_status.to_status(status))

    server = grpc.aio.server()
    review_service_pb2_grpc.add_ReviewServiceServicer_to_server(EchoReview(), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    await checks.set(review.full_name, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = render(
        [Upstream("review", [review], [("127.0.0.1", port)])], listen_port=0, admin_port=0
    )
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(config))
    admin_file = tmp_path / "admin"
    envoy = await asyncio.create_subprocess_exec(
        *(ENVOY, "-c", str(tmp_path / "envoy.yaml"), "--admin-address-path", str(admin_file)),
        *("--use-dynamic-base-id", "--log-level", "warn"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (admin_file.exists() and admin_file.read_text().strip()):
            assert envoy.returncode is None and time.monotonic() < deadline, "envoy is not up"
            await asyncio.sleep(0.05)
        admin = admin_file.read_text().strip()
        listeners = await asyncio.to_thread(_read_json, f"http://{admin}/listeners?format=json")
        socket = listeners["listener_statuses"][0]["local_address"]
        address = f"127.0.0.1:{socket['socket_address']['port_value']}"
        url = f"http://{address}/mlmesh.review.v1.ReviewService/"
        headers = {"authorization": "Bearer sk-web-caller", "x-mlmesh-actor": "key:forged"}
        message = review_rpc.ListItemsRequest(model="digits").SerializeToString()
        # The cluster is healthy within a few health-check intervals.
        while True:
            status, reply_headers, body = await asyncio.to_thread(
                _grpc_web_post, url + "ListItems", message, headers
            )
            if status != 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert status == 200
        assert reply_headers["content-type"] == "application/grpc-web+proto"
        messages, trailers = _frames(body)
        assert trailers["grpc-status"] == "0"
        (listed,) = [review_rpc.ListItemsResponse.FromString(m) for m in messages]
        assert listed.next_page_token == "next"
        (item,) = listed.items
        assert item.model == "digits"
        assert item.inputs == "Bearer sk-web-caller"  # the service sees the key
        assert item.primary_output == "<stripped>"  # mesh-only headers never pass

        # A failure before any message: the status and its details are headers.
        status, reply_headers, body = await asyncio.to_thread(
            _grpc_web_post,
            url + "ClaimItem",
            review_rpc.ClaimItemRequest(name="items/x").SerializeToString(),
            headers,
        )
        assert status == 200 and body == b""
        assert reply_headers["grpc-status"] == str(grpc.StatusCode.FAILED_PRECONDITION.value[0])
        assert reply_headers["grpc-message"] == "held by <Jos%C3%A9>"  # percent-encoded
        details = reply_headers["grpc-status-details-bin"]
        rich = status_pb2.Status.FromString(base64.b64decode(details + "=" * (-len(details) % 4)))
        info = error_details_pb2.ErrorInfo()
        assert rich.details[0].Unpack(info) and info.reason == "ITEM_CLAIMED"

        # No gRPC-Web route outside the routed services.
        status, _, _ = await asyncio.to_thread(
            _grpc_web_post, f"http://{address}/mlmesh.other.v1.Other/Call", b"", headers
        )
        assert status == 404

        # Plain gRPC keeps its own routes.
        async with grpc.aio.insecure_channel(address) as channel:
            stub = review_service_pb2_grpc.ReviewServiceStub(channel)
            answer = await stub.ListItems(
                review_rpc.ListItemsRequest(model="iris"),
                metadata=(("authorization", "Bearer sk-grpc"),),
            )
        assert answer.items[0].inputs == "Bearer sk-grpc" and answer.items[0].model == "iris"
    finally:
        envoy.terminate()
        await envoy.wait()
        await server.stop(None)

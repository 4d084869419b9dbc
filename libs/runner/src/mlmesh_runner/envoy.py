"""Renders the Envoy front door's configuration.

One listener routes gRPC by service prefix to each service's cluster, and
plain HTTP by path prefix (the gateway's OpenAI-compatible ``/v1/``) to the
service's HTTP cluster (HTTP/1.1, health-checked on ``/healthz``). Methods
whose contract says `idempotency_level = NO_SIDE_EFFECTS` get their own route
with a retry policy; nothing else is retried. Browsers call the same gRPC
API as gRPC-Web (the reviewers' page), bridged by Envoy's grpc_web filter
on a route of their own per service. Clusters have active gRPC
health checks, outlier detection and explicit circuit breakers. Admin listens
on loopback only.

Envoy authenticates nothing: every service checks the caller's key itself, in
process. Envoy is hardened as an edge proxy after Envoy's "Configuring Envoy
as an edge proxy" best practices (overload manager, buffer and HTTP/2 limits,
header timeouts, path normalisation, untrusted client headers); the values
are the module constants below, each with its reason.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor, descriptor_pb2


@dataclass(frozen=True)
class Upstream:
    """One routed service: its cluster name, gRPC service descriptors and endpoints."""

    cluster: str
    services: Sequence[descriptor.ServiceDescriptor]
    endpoints: Sequence[tuple[str, int]]
    # A single-writer service's primary: its writing methods (every method
    # not NO_SIDE_EFFECTS) go to this endpoint alone, in the cluster
    # ``<cluster>_primary``; its reads go to every endpoint.
    primary: tuple[str, int] | None = None
    # Plain-HTTP path prefixes routed to the service's HTTP port (the
    # gateway's OpenAI-compatible /v1/), in the cluster ``<cluster>_http``.
    http_prefixes: Sequence[str] = ()
    http_endpoints: Sequence[tuple[str, int]] = ()

    @property
    def writer_cluster(self) -> str:
        return f"{self.cluster}_primary" if self.primary is not None else self.cluster


# How every Envoy of the mesh runs (the runner's and Compose's): warnings
# only, and a short drain, since clients retry on another replica.
RUN_FLAGS = ("--log-level", "warn", "--drain-time-s", "1", "--parent-shutdown-time-s", "2")


def healthy_clusters(clusters: dict[str, Any]) -> set[str]:
    """The clusters of an admin ``/clusters?format=json`` answer whose every
    host is HEALTHY and passes its active health check."""
    healthy = set()
    for cluster in clusters.get("cluster_statuses", []):
        statuses = cluster.get("host_statuses", [])
        if statuses and all(
            s.get("health_status", {}).get("eds_health_status") == "HEALTHY"
            and not s["health_status"].get("failed_active_health_check")
            for s in statuses
        ):
            healthy.add(cluster["name"])
    return healthy


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def read_only_methods(service: descriptor.ServiceDescriptor) -> list[str]:
    """Full paths (/pkg.Service/Method) of the methods marked NO_SIDE_EFFECTS."""
    paths = []
    for method in service.methods:
        options = descriptor_pb2.MethodOptions()
        options.ParseFromString(method.GetOptions().SerializeToString())
        if options.idempotency_level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS:
            paths.append(f"/{service.full_name}/{method.name}")
    return paths


_RETRY = {
    "retry_on": "unavailable,reset,connect-failure,refused-stream",
    "num_retries": 2,
    "per_try_timeout": "0s",
    "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": 3,
}


# Edge-proxy limits. Buffers: 32 KiB per connection, so a slow or hostile
# peer pins little memory; Envoy applies back-pressure (HTTP/2 flow control)
# instead of buffering more.
BUFFER_LIMIT_BYTES = 32 * 1024
# Client-facing HTTP/2: at most 100 concurrent streams per connection (gRPC
# channels queue beyond that); the windows bound what one stream (1 MiB) and
# one connection (4 MiB) can make Envoy hold. Envoy's edge example uses
# 64 KiB / 1 MiB; 64 KiB per round trip would cap a remote client's model
# upload at ~1.3 MB/s on a 50 ms path, and uploads here were no faster
# locally with it.
DOWNSTREAM_HTTP2 = {
    "max_concurrent_streams": 100,
    "initial_stream_window_size": 1024 * 1024,
    "initial_connection_window_size": 4 * 1024 * 1024,
}
# Envoy -> services: the mesh's own services, so larger windows keep 4 MiB
# upload chunks and 1 MiB download chunks flowing without a stall per chunk.
UPSTREAM_HTTP2 = {
    "initial_stream_window_size": 4 * 1024 * 1024,
    "initial_connection_window_size": 16 * 1024 * 1024,
}
# Per cluster, sized for a mesh rather than a single client: every watch,
# token stream and upload holds one request slot for its whole life, so
# max_requests is high enough that long streams never starve unary calls.
CIRCUIT_BREAKERS = {
    "thresholds": [
        {
            "priority": "DEFAULT",
            "max_connections": 1024,
            "max_pending_requests": 1024,
            "max_requests": 10000,
            # Retries in flight to the cluster (1% of max_requests): enough
            # for a rolling restart (Envoy's default is 3), too few to pile
            # onto a failing upstream.
            "max_retries": 100,
        }
    ]
}
# Envoy's heap, as the overload manager sees it (Envoy runs in tens of MiB
# here; the deployment's container memory limit must sit above this), and
# all its client connections together.
MAX_HEAP_BYTES = 1024**3
MAX_DOWNSTREAM_CONNECTIONS = 10000
# Headers that only a mesh component may set. Services do not trust them
# (they authenticate every call in process); Envoy strips them from client
# requests anyway, as defence in depth.
UNTRUSTED_REQUEST_HEADERS = ["x-mlmesh-actor", "x-mlmesh-key-id"]


def _silent_streams(service: descriptor.ServiceDescriptor) -> set[str]:
    """Read-only server streams (watches, downloads): a watch may carry no
    message for hours, so no idle timeout may cut it."""
    return {
        f"/{service.full_name}/{method.name}"
        for method in service.methods
        if method.server_streaming
    } & set(read_only_methods(service))


def _routes(upstreams: Iterable[Upstream]) -> list[dict[str, Any]]:
    # Client deadlines (grpc-timeout) govern; no fixed route timeout cuts streams.
    action = {"timeout": "0s", "max_stream_duration": {"grpc_timeout_header_max": "0s"}}
    routes: list[dict[str, Any]] = []
    for upstream in upstreams:
        for service in upstream.services:
            silent = _silent_streams(service)
            for path in read_only_methods(service):
                route = {"cluster": upstream.cluster, **action, "retry_policy": _RETRY}
                if path in silent:
                    # Overrides the connection manager's stream_idle_timeout.
                    route["idle_timeout"] = "0s"
                routes.append({"name": path, "match": {"path": path, "grpc": {}}, "route": route})
            routes.append(
                {
                    "name": service.full_name,
                    "match": {"prefix": f"/{service.full_name}/", "grpc": {}},
                    "route": {"cluster": upstream.writer_cluster, **action},
                }
            )
    # gRPC-Web (browsers, through GRPC_WEB_FILTER): the filter rewrites the
    # content-type to application/grpc only after the route was chosen, so
    # the gRPC routes' ``grpc`` match never takes these; one route per
    # service takes them, to the cluster its writes go to, not retried.
    for upstream in upstreams:
        for service in upstream.services:
            routes.append(
                {
                    "name": f"{service.full_name}:grpc-web",
                    "match": {
                        "prefix": f"/{service.full_name}/",
                        "headers": [GRPC_WEB_CONTENT_TYPE],
                    },
                    "route": {"cluster": upstream.writer_cluster, **action},
                }
            )
    # Plain HTTP (the OpenAI-compatible surface): no retries (a completion is
    # not idempotent); streams (SSE) flow as they come, with no route timeout;
    # the client's disconnect reaches the service, which stops the work.
    for upstream in upstreams:
        for prefix in upstream.http_prefixes:
            routes.append(
                {
                    "name": f"{upstream.cluster}_http:{prefix}",
                    "match": {"prefix": prefix},
                    "route": {"cluster": f"{upstream.cluster}_http", "timeout": "0s"},
                }
            )
    # Every service's reflection describes the whole mesh's contracts, so the
    # first upstream answers grpcurl's reflection through Envoy.
    first = next(iter(upstreams), None)
    if first is not None:
        for prefix in (
            "/grpc.reflection.v1.ServerReflection/",
            "/grpc.reflection.v1alpha.ServerReflection/",
        ):
            routes.append(
                {
                    "name": prefix,
                    "match": {"prefix": prefix},
                    "route": {"cluster": first.cluster, **action},
                }
            )
    return routes


def _clusters(upstream: Upstream) -> list[dict[str, Any]]:
    """The upstream's cluster, and its primary's for a single writer."""
    clusters = [_cluster(upstream.cluster, upstream)]
    if upstream.primary is not None:
        clusters.append(_cluster(upstream.writer_cluster, upstream, [upstream.primary]))
    if upstream.http_prefixes:
        clusters.append(_http_cluster(f"{upstream.cluster}_http", upstream.http_endpoints))
    return clusters


def _load_assignment(name: str, endpoints: Sequence[tuple[str, int]]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}}
                    for h, p in endpoints
                ]
            }
        ],
    }


def _health_check(check: dict[str, Any]) -> dict[str, Any]:
    """Every 2 s, 2 s each; out after 3 failures in a row, back after 1."""
    return {
        "timeout": "2s",
        "interval": "2s",
        "no_traffic_interval": "2s",
        "unhealthy_threshold": 3,
        "healthy_threshold": 1,
        **check,
    }


def _http_cluster(name: str, endpoints: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """A service's plain-HTTP port: HTTP/1.1 (one request per connection at
    a time, connections pooled), health-checked on GET /healthz."""
    return {
        "name": name,
        "type": "STATIC" if all(_is_ip(h) for h, _ in endpoints) else "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
        "circuit_breakers": CIRCUIT_BREAKERS,
        "load_assignment": _load_assignment(name, endpoints),
        "health_checks": [_health_check({"http_health_check": {"path": "/healthz"}})],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
    }


def _cluster(
    name: str, upstream: Upstream, endpoints: Sequence[tuple[str, int]] | None = None
) -> dict[str, Any]:
    health_service = upstream.services[0].full_name
    endpoints = upstream.endpoints if endpoints is None else endpoints
    return {
        "name": name,
        # Local runs name IP endpoints; deployments name DNS (Kubernetes Services).
        "type": "STATIC" if all(_is_ip(h) for h, _ in endpoints) else "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
        "circuit_breakers": CIRCUIT_BREAKERS,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": UPSTREAM_HTTP2},
            },
        },
        "load_assignment": _load_assignment(name, endpoints),
        # Active health checks. A refused connection fails a check at once; a
        # check that is only slow (a busy event loop on a loaded node: seen
        # on 2 cores with vLLM's worker on one of them) gets 2 s, and 3 in a
        # row are needed, so a starved but working service (often the only
        # host, with no panic routing) is not taken out for seconds.
        "health_checks": [_health_check({"grpc_health_check": {"service_name": health_service}})],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 3,
            "interval": "2s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 50,
        },
    }


# gRPC-Web (the reviewers' page): a browser's POST with content-type
# application/grpc-web(+proto) is bridged to gRPC (HTTP/2, te: trailers) and
# the answer's trailers come back as the body's last frame (flag 0x80). The
# request's headers, ``authorization`` among them, reach the service as
# metadata, which checks the key in process as for any gRPC call.
GRPC_WEB_FILTER = {
    "name": "envoy.filters.http.grpc_web",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"
    },
}

# The content types the filter bridges (binary and base64 text), matched whole.
GRPC_WEB_CONTENT_TYPE = {
    "name": "content-type",
    "string_match": {"safe_regex": {"regex": r"application/grpc-web(-text)?(\+proto)?"}},
}


_HEAP = "envoy.resource_monitors.fixed_heap"
_OVERLOAD_MANAGER = {
    "refresh_interval": "0.25s",
    "resource_monitors": [
        {
            "name": _HEAP,
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                "max_heap_size_bytes": MAX_HEAP_BYTES,
            },
        },
        {
            # Checked as each connection is accepted; over the limit, the
            # connection is closed at once.
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                "downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
            },
        },
    ],
    "actions": [
        {
            "name": "envoy.overload_actions.shrink_heap",
            "triggers": [{"name": _HEAP, "threshold": {"value": 0.95}}],
        },
        {
            "name": "envoy.overload_actions.stop_accepting_requests",
            "triggers": [{"name": _HEAP, "threshold": {"value": 0.98}}],
        },
    ],
}


def render(
    upstreams: Sequence[Upstream],
    *,
    listen_host: str = "127.0.0.1",
    listen_port: int = 8080,
    admin_port: int = 9901,
    otlp_endpoint: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """The whole bootstrap config as a dict (dump it as YAML or JSON)."""
    access_log = {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {
                "json_format": {
                    "ts": "%START_TIME%",
                    "kind": "access",
                    "method": "%REQ(:PATH)%",
                    "grpc_status": "%GRPC_STATUS_NUMBER%",
                    "http_status": "%RESPONSE_CODE%",
                    "duration_ms": "%DURATION%",
                    "upstream": "%UPSTREAM_HOST%",
                    "request_id": "%REQ(X-REQUEST-ID)%",
                    "trace_id": "%TRACE_ID%",
                    "bytes_in": "%BYTES_RECEIVED%",
                    "bytes_out": "%BYTES_SENT%",
                    "flags": "%RESPONSE_FLAGS%",
                }
            },
        },
    }
    manager: dict[str, Any] = {
        "@type": "type.googleapis.com/"
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "generate_request_id": True,
        # Request ids only correlate logs (nothing trusts them): keep a
        # client's own, which use_remote_address would otherwise replace.
        "preserve_external_request_id": True,
        # The client's address is the peer's: no client-sent
        # x-forwarded-for is trusted, and x-envoy-* headers from clients
        # are dropped.
        "use_remote_address": True,
        "xff_num_trusted_hops": 0,
        # One canonical path per method, so a route match cannot be dodged
        # with /./, // or %2F spellings; gRPC paths never escape slashes, so
        # such a request is rejected (a gRPC client follows no redirect).
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "common_http_protocol_options": {
            "idle_timeout": "3600s",  # a connection with no stream for 1 h
            # Services may treat '_' and '-' alike; a header with '_' could
            # then pose as one Envoy removed.
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        "http2_protocol_options": DOWNSTREAM_HTTP2,
        # A client has 10 s to send a request's headers (slowloris).
        "request_headers_timeout": "10s",
        # No whole-request timeout: an upload streams for as long as it takes.
        "request_timeout": "0s",
        # A stream with nothing sent either way for 5 min ends, except on
        # routes that disable it (silent watches, see _routes).
        "stream_idle_timeout": "300s",
        "access_log": [access_log],
        "route_config": {
            "name": "mlmesh",
            "request_headers_to_remove": UNTRUSTED_REQUEST_HEADERS,
            "virtual_hosts": [
                {
                    "name": "mlmesh",
                    "domains": ["*"],
                    "routes": _routes(upstreams),
                }
            ],
        },
        "http_filters": [
            GRPC_WEB_FILTER,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    clusters = [cluster for u in upstreams for cluster in _clusters(u)]
    if otlp_endpoint:
        # Every request is sampled (random_sampling defaults to 100%), also
        # one whose caller sent its own x-request-id: by default Envoy reads
        # the sampling decision from the request id, and a caller's id that
        # is not a UUID it issued (the services' own ids are not) would
        # leave that request untraced.
        manager["request_id_extension"] = {
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                "use_request_id_for_trace_sampling": False,
            }
        }
        manager["tracing"] = {
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": "otel_collector"},
                        "timeout": "1s",
                    },
                    "service_name": "envoy",
                },
            },
            # Span attributes (trace stores such as Phoenix keep these, not
            # the resource): who made the span, and the request id every
            # service's span and log line carries too.
            "custom_tags": [
                {"tag": "service.name", "literal": {"value": "envoy"}},
                {"tag": "mlmesh.request_id", "request_header": {"name": "x-request-id"}},
            ],
        }
        clusters.append(
            {
                "name": "otel_collector",
                "type": "STATIC",
                "connect_timeout": "1s",
                "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
                "circuit_breakers": CIRCUIT_BREAKERS,
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/"
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    },
                },
                "load_assignment": {
                    "cluster_name": "otel_collector",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {
                                                "address": otlp_endpoint[0],
                                                "port_value": otlp_endpoint[1],
                                            }
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        )
    return {
        # Admin can reconfigure and stop Envoy: loopback only, never exposed.
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "overload_manager": _OVERLOAD_MANAGER,
        "static_resources": {
            "listeners": [
                {
                    "name": "mlmesh",
                    "address": {
                        "socket_address": {"address": listen_host, "port_value": listen_port}
                    },
                    "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }

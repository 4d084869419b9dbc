"""Renders the Envoy front door's configuration.

One listener routes gRPC by service prefix to each service's cluster. Methods
whose contract says `idempotency_level = NO_SIDE_EFFECTS` get their own route
with a retry policy; nothing else is retried. Clusters have active gRPC
health checks and outlier detection. Admin listens on loopback only.
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
    # Services that check API keys themselves: Envoy skips its external
    # authorization call on their routes (one gRPC hop less per request).
    authenticate_themselves: frozenset[str] = frozenset()


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


_SKIP_AUTHZ = {
    "envoy.filters.http.ext_authz": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
        "disabled": True,
    }
}


def _routes(upstreams: Iterable[Upstream], authz: bool = False) -> list[dict[str, Any]]:
    # Client deadlines (grpc-timeout) govern; no fixed route timeout cuts streams.
    action = {"timeout": "0s", "max_stream_duration": {"grpc_timeout_header_max": "0s"}}
    routes: list[dict[str, Any]] = []
    for upstream in upstreams:
        for service in upstream.services:
            first_route = len(routes)
            for path in read_only_methods(service):
                routes.append(
                    {
                        "name": path,
                        "match": {"path": path, "grpc": {}},
                        "route": {"cluster": upstream.cluster, **action, "retry_policy": _RETRY},
                    }
                )
            routes.append(
                {
                    "name": service.full_name,
                    "match": {"prefix": f"/{service.full_name}/", "grpc": {}},
                    "route": {"cluster": upstream.cluster, **action},
                }
            )
            if authz and service.full_name in upstream.authenticate_themselves:
                for route in routes[first_route:]:
                    route["typed_per_filter_config"] = _SKIP_AUTHZ
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


def _cluster(upstream: Upstream) -> dict[str, Any]:
    health_service = upstream.services[0].full_name
    return {
        "name": upstream.cluster,
        # Local runs name IP endpoints; deployments name DNS (Kubernetes Services).
        "type": "STATIC" if all(_is_ip(h) for h, _ in upstream.endpoints) else "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "initial_stream_window_size": 4 * 1024 * 1024,
                        "initial_connection_window_size": 16 * 1024 * 1024,
                    }
                },
            },
        },
        "load_assignment": {
            "cluster_name": upstream.cluster,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                        for host, port in upstream.endpoints
                    ]
                }
            ],
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "2s",
                "no_traffic_interval": "2s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": health_service},
            }
        ],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 3,
            "interval": "2s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 50,
        },
    }


def _authz_filter(cluster: str | None) -> list[dict[str, Any]]:
    """External authorization by the gateway on every route (keys, scopes)."""
    if cluster is None:
        return []
    return [
        {
            "name": "envoy.filters.http.ext_authz",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": "1s"},
                # Fail closed: no answer from the gateway means no access.
                "failure_mode_allow": False,
                "status_on_error": {"code": "ServiceUnavailable"},
                "include_peer_certificate": False,
            },
        }
    ]


def render(
    upstreams: Sequence[Upstream],
    *,
    authz_cluster: str | None = None,
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
        "http2_protocol_options": {
            "initial_stream_window_size": 4 * 1024 * 1024,
            "initial_connection_window_size": 16 * 1024 * 1024,
        },
        "stream_idle_timeout": "300s",
        "access_log": [access_log],
        "route_config": {
            "name": "mlmesh",
            "virtual_hosts": [
                {
                    "name": "mlmesh",
                    "domains": ["*"],
                    "routes": _routes(upstreams, authz=authz_cluster is not None),
                }
            ],
        },
        "http_filters": [
            *_authz_filter(authz_cluster),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    clusters = [_cluster(u) for u in upstreams]
    if otlp_endpoint:
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
            }
        }
        clusters.append(
            {
                "name": "otel_collector",
                "type": "STATIC",
                "connect_timeout": "1s",
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
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "mlmesh",
                    "address": {
                        "socket_address": {"address": listen_host, "port_value": listen_port}
                    },
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

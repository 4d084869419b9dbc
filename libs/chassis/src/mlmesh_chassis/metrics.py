"""Prometheus request metrics, one endpoint per service process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RPC_REQUESTS = Counter(
    "mlmesh_rpc_requests",
    "gRPC calls served, by method and status code.",
    ["service", "method", "code"],
    registry=REGISTRY,
)
RPC_DURATION = Histogram(
    "mlmesh_rpc_duration_seconds",
    "Time to serve a gRPC call (streams: until the end).",
    ["service", "method"],
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RPC_IN_FLIGHT = Gauge(
    "mlmesh_rpc_in_flight",
    "gRPC calls being served now.",
    ["service"],
    registry=REGISTRY,
)


def start_metrics_server(host: str, port: int) -> int:
    """Serves /metrics; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)

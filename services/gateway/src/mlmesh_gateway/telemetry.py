"""Gateway metrics (Prometheus, on the service's /metrics) and span attributes
(OpenTelemetry GenAI semantic conventions) for every model call."""

from __future__ import annotations

from typing import Any

from mlmesh_chassis.metrics import REGISTRY
from opentelemetry import trace
from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "mlmesh_gateway_requests",
    "Model calls through the gateway.",
    ["service", "model", "code"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "mlmesh_gateway_tokens",
    "Tokens through the gateway (input/output).",
    ["model", "direction"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "mlmesh_gateway_rejections", "Requests refused by a limit.", ["limit"], registry=REGISTRY
)
TIME_TO_FIRST_TOKEN = Histogram(
    "mlmesh_gateway_time_to_first_token_seconds",
    "Gateway-measured time to first token.",
    ["model"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BACKEND_PICKS = Counter(
    "mlmesh_gateway_backend_picks",
    "Endpoint chosen for a request.",
    ["endpoint", "region"],
    registry=REGISTRY,
)


def annotate(**attributes: Any) -> None:
    """Sets attributes (GenAI conventions: gen_ai.*) on the current server span."""
    span = trace.get_current_span()
    for name, value in attributes.items():
        if value is not None:
            span.set_attribute(name.replace("__", "."), value)

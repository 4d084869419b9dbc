"""OpenTelemetry set-up: W3C trace context in and out of every call."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)


def configure_tracing(
    service: str, exporter: str = "", extra_exporter: SpanExporter | None = None
) -> TracerProvider:
    """Installs a tracer provider once per process.

    ``exporter``: "" keeps spans in-process (ids still flow into logs and to
    peers), "console" prints them, anything else is an OTLP gRPC endpoint.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        provider = current
    else:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        trace.set_tracer_provider(provider)
    span_exporter: SpanExporter | None = extra_exporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    elif exporter:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=exporter, insecure=True)
    if span_exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return provider

"""OpenTelemetry set-up: W3C trace context in and out of every call.

Spans leave the process off the request path: a span's end only appends it
to a bounded queue (``MAX_QUEUE_SIZE``); a background thread exports batches
over OTLP gRPC with a short timeout. When the collector is slow, down or
absent the queue fills and further spans are dropped (counted, and logged at
most once a minute): a request never waits on the trace store, and memory
stays bounded.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)

# Spans waiting for export; past this, new spans are dropped.
MAX_QUEUE_SIZE = 2048
MAX_EXPORT_BATCH_SIZE = 512
# How often the exporter thread sends what has queued.
SCHEDULE_DELAY_MS = 1000
# One export's budget (the OTLP exporter's retries included), in seconds.
EXPORT_TIMEOUT_S = 2.0
# The SDK and the OTLP exporter warn on every dropped span or failed batch:
# with the collector down that would be a line per span. At most one a minute.
_NOISY_LOGGERS = (
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
)


class _OncePerInterval(logging.Filter):
    """Lets one record through per ``interval_s`` for each logger."""

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        last = self._last.get(record.name)
        if last is not None and now - last < self.interval_s:
            return False
        self._last[record.name] = now
        return True


class ServiceNameProcessor(SpanProcessor):
    """Puts ``service.name`` on each span as an attribute too: some trace
    stores (Phoenix) keep span attributes but not the resource's."""

    def __init__(self, service: str) -> None:
        self.service = service

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        span.set_attribute("service.name", self.service)

    def on_end(self, span: ReadableSpan) -> None:
        return None


def bounded_processor(exporter: SpanExporter) -> BatchSpanProcessor:
    """A batch processor that never blocks the caller and never grows past
    ``MAX_QUEUE_SIZE`` spans."""
    return BatchSpanProcessor(
        exporter,
        max_queue_size=MAX_QUEUE_SIZE,
        schedule_delay_millis=SCHEDULE_DELAY_MS,
        max_export_batch_size=MAX_EXPORT_BATCH_SIZE,
        export_timeout_millis=EXPORT_TIMEOUT_S * 1000,
    )


def otlp_exporter(endpoint: str) -> SpanExporter:
    """OTLP over gRPC to ``endpoint`` (``http://host:port`` or ``host:port``),
    each export given ``EXPORT_TIMEOUT_S`` in all."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=EXPORT_TIMEOUT_S)


def _quiet_export_warnings() -> None:
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OncePerInterval) for f in logger.filters):
            logger.addFilter(_OncePerInterval())


def configure_tracing(
    service: str, exporter: str = "", extra_exporter: SpanExporter | None = None
) -> TracerProvider:
    """Installs a tracer provider once per process.

    ``exporter``: "" keeps spans in-process (ids still flow into logs and to
    peers), "console" prints them, anything else is an OTLP gRPC endpoint
    (e.g. http://127.0.0.1:4317), exported through ``bounded_processor``.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        provider = current
    else:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(ServiceNameProcessor(service))
        trace.set_tracer_provider(provider)
    span_exporter: SpanExporter | None = extra_exporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    elif exporter:
        span_exporter = otlp_exporter(exporter)
    if span_exporter is not None:
        _quiet_export_warnings()
        provider.add_span_processor(bounded_processor(span_exporter))
    return provider

"""Span export never slows or fails a request: it is off the request path,
bounded, and drops spans rather than queueing them without limit.

The collector here is real sockets: a port nothing listens on (refused), and
one that accepts connections but never answers (a hung trace store).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any, ClassVar

import grpc
import pytest
from mlmesh.gateway.v1 import gateway_pb2
from mlmesh.registry.v1 import model_pb2, registry_service_pb2_grpc
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh_chassis.auth import KeyView, ServiceIdentity, set_service_identity
from mlmesh_chassis.config import ServiceSettings
from mlmesh_chassis.server import start_service
from mlmesh_chassis.testing import bearer_metadata, directory_key
from mlmesh_chassis.tracing import (
    MAX_QUEUE_SIZE,
    bounded_processor,
    configure_tracing,
    otlp_exporter,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


@pytest.fixture(params=["refused", "hung"])
def collector(request: pytest.FixtureRequest) -> Iterator[str]:
    """An OTLP endpoint that is down: refused, or accepting and never answering."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if request.param == "hung":
            sock.listen(1024)  # the kernel completes handshakes; nobody reads
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def _queued(processor: BatchSpanProcessor) -> int:
    # The SDK's own queue: the bound under test.
    return len(processor._batch_processor._queue)


def test_spans_are_dropped_not_queued_without_limit(collector: str) -> None:
    provider = TracerProvider()
    processor = bounded_processor(otlp_exporter(collector))
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    most = 0
    # Three queues' worth of spans, ended on this (the "request") thread.
    for i in range(3 * MAX_QUEUE_SIZE):
        with tracer.start_as_current_span("call") as span:
            span.set_attribute("i", i)
        most = max(most, _queued(processor))
    # Every span ended (the loop did not wait on the collector), and what
    # waits for export never exceeded the bound: the rest was dropped.
    assert most == MAX_QUEUE_SIZE
    assert _queued(processor) <= MAX_QUEUE_SIZE
    provider.shutdown()


class _Settings(ServiceSettings):
    service_name: ClassVar[str] = "export-test"


class _Registry(registry_service_pb2_grpc.RegistryServiceServicer):
    async def GetModel(self, request: Any, context: Any) -> rpc.GetModelResponse:
        return rpc.GetModelResponse(model=model_pb2.Model(name=request.name))


async def test_calls_succeed_while_the_trace_store_is_down(collector: str, tmp_path: Any) -> None:
    """A real chassis server exporting to a dead collector serves every call."""
    configure_tracing("export-test", exporter=collector)
    view = KeyView()
    caller, secret = directory_key([gateway_pb2.PLATFORM_SERVICE_REGISTRY])
    view.replace([caller], 1)

    def register(server: grpc.aio.Server) -> list[str]:
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(_Registry(), server)
        return ["mlmesh.registry.v1.RegistryService"]

    settings = _Settings(port=0, metrics_port=-1, drain_seconds=0.0)
    host = await start_service(settings, register, error_domain="mlmesh.test", key_view=view)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            for i in range(300):
                reply = await stub.GetModel(
                    rpc.GetModelRequest(name=f"m{i}"),
                    metadata=bearer_metadata(secret),
                    timeout=30,
                )
                assert reply.model.name == f"m{i}"
    finally:
        await host.shutdown()
        set_service_identity(ServiceIdentity(None))

"""The chassis against a real grpc.aio server on port 0.

The servicer here is a test double of RegistryService whose handlers raise
domain errors, read the call context, and call back into the same server.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request
from typing import ClassVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlmesh.gateway.v1 import gateway_pb2
from mlmesh.registry.v1 import model_pb2, registry_service_pb2_grpc
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh_chassis import context as call_context
from mlmesh_chassis.auth import (
    KeyView,
    ServiceIdentity,
    current_principal,
    set_service_identity,
)
from mlmesh_chassis.config import ServiceSettings
from mlmesh_chassis.errors import NotFound, Unavailable
from mlmesh_chassis.interceptors import client_interceptors
from mlmesh_chassis.logs import JsonFormatter
from mlmesh_chassis.retry import call_idempotent
from mlmesh_chassis.server import start_service
from mlmesh_chassis.testing import directory_key, expect_error
from mlmesh_chassis.tracing import configure_tracing
from opentelemetry import trace

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Settings(ServiceSettings):
    service_name: ClassVar[str] = "chassis-test"


class Double(registry_service_pb2_grpc.RegistryServiceServicer):
    def __init__(self) -> None:
        self.port = 0
        self.flaky_failures = 0
        self.seen: dict[str, object] = {}

    async def GetModel(self, request, context):
        if request.name == "missing":
            raise NotFound("model", "missing")
        if request.name == "boom":
            raise ValueError("a bug")
        self.seen["request_id"] = call_context.request_id_var.get()
        self.seen["remaining"] = call_context.remaining_time()
        self.seen["trace_id"] = format(trace.get_current_span().get_span_context().trace_id, "032x")
        self.seen["actor"] = current_principal().actor
        logging.getLogger("test").info("handled")
        return rpc.GetModelResponse(model=model_pb2.Model(name=request.name))

    async def ListModels(self, request, context):
        """Calls GetModel on this same server: deadline, trace and this
        service's own key must flow."""
        outer = call_context.remaining_time()
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{self.port}", interceptors=client_interceptors()
        ) as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            await stub.GetModel(rpc.GetModelRequest(name="inner"))
        self.seen["outer_remaining"] = outer
        self.seen["outer_actor"] = current_principal().actor
        return rpc.ListModelsResponse()

    async def ResolveModelReference(self, request, context):
        if self.flaky_failures > 0:
            self.flaky_failures -= 1
            raise Unavailable("flaky backend", retry_after_s=0.05)
        return rpc.ResolveModelReferenceResponse()


class _WithKey(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def intercept_unary_unary(self, continuation, details, request):
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if "authorization" not in metadata:
            metadata["authorization"] = f"Bearer {self.secret}"
        return await continuation(
            grpc.aio.ClientCallDetails(
                details.method, details.timeout, metadata, None, details.wait_for_ready
            ),
            request,
        )


@pytest.fixture(scope="module")
async def served(tmp_path_factory):
    configure_tracing("chassis-test")
    double = Double()

    def register(server):
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(double, server)
        return ["mlmesh.registry.v1.RegistryService"]

    # The caller's key, and this service's own (its inner calls carry it).
    view = KeyView()
    caller, secret = directory_key([gateway_pb2.PLATFORM_SERVICE_REGISTRY])
    own, own_secret = directory_key([gateway_pb2.PLATFORM_SERVICE_REGISTRY_READ])
    view.replace([caller, own], 1)
    key_file = tmp_path_factory.mktemp("keys") / "service.key"
    key_file.write_text(own_secret)
    settings = Settings(port=0, metrics_port=0, drain_seconds=0.3, service_key_file=key_file)
    host = await start_service(settings, register, error_domain="mlmesh.test", key_view=view)
    double.port = host.port
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{host.port}", interceptors=[_WithKey(secret)]
    ) as channel:
        yield host, double, registry_service_pb2_grpc.RegistryServiceStub(channel)
    await host.shutdown()
    set_service_identity(ServiceIdentity(None))


async def test_domain_error_maps_to_status_with_error_info(served):
    _, _, stub = served
    details = await expect_error(
        stub.GetModel(rpc.GetModelRequest(name="missing")), grpc.StatusCode.NOT_FOUND
    )
    assert details.message == "model 'missing' not found"
    assert details.error_info.reason == "MODEL_NOT_FOUND"  # the cause, not the code
    assert details.error_info.domain == "mlmesh.test"
    assert dict(details.error_info.metadata) == {"resource_type": "model", "name": "missing"}


async def test_unexpected_error_is_internal_with_request_id(served):
    _, _, stub = served
    details = await expect_error(
        stub.GetModel(rpc.GetModelRequest(name="boom"), metadata=[("x-request-id", "req-1")]),
        grpc.StatusCode.INTERNAL,
    )
    assert details.error_info.reason == "INTERNAL"
    assert details.error_info.metadata["request_id"] == "req-1"
    assert "a bug" not in details.message  # no internals leak to callers


async def test_request_id_trace_and_deadline_reach_the_handler(served):
    _, double, stub = served
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    await stub.GetModel(
        rpc.GetModelRequest(name="ok"),
        timeout=3,
        metadata=[("x-request-id", "req-2"), ("traceparent", traceparent)],
    )
    assert double.seen["request_id"] == "req-2"
    assert double.seen["trace_id"] == TRACE_ID
    assert 2.0 < double.seen["remaining"] <= 3.05  # grpc-timeout is rounded on the wire


async def test_deadline_and_trace_propagate_to_outgoing_calls(served):
    _, double, stub = served
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    await stub.ListModels(
        rpc.ListModelsRequest(),
        timeout=2,
        metadata=[("traceparent", traceparent), ("x-request-id", "req-3")],
    )
    # the inner GetModel ran under the outer call's deadline (no timeout of its
    # own was given; grpc-timeout is rounded on the wire) and trace
    assert double.seen["remaining"] is not None
    assert double.seen["remaining"] <= double.seen["outer_remaining"] + 0.01 <= 2.05
    assert double.seen["trace_id"] == TRACE_ID
    assert double.seen["request_id"] == "req-3"
    # the inner call was made with the service's own key, not the caller's
    assert double.seen["actor"] != double.seen["outer_actor"]


async def test_retry_policy_honours_retry_info(served):
    _, double, stub = served
    double.flaky_failures = 2
    loop = asyncio.get_running_loop()
    start = loop.time()
    await call_idempotent(
        lambda: stub.ResolveModelReference(
            rpc.ResolveModelReferenceRequest(reference={"model": "mm"})
        )
    )
    assert double.flaky_failures == 0
    assert loop.time() - start >= 0.1  # two RetryInfo delays of 50 ms
    double.flaky_failures = 10
    await expect_error(
        call_idempotent(
            lambda: stub.ResolveModelReference(
                rpc.ResolveModelReferenceRequest(reference={"model": "mm"})
            ),
            attempts=3,
        ),
        grpc.StatusCode.UNAVAILABLE,
    )


async def test_metrics_endpoint_counts_calls(served):
    host, _, stub = served
    await stub.GetModel(rpc.GetModelRequest(name="ok"))
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{host.metrics_port}/metrics").read()
    )
    text = body.decode()
    assert (
        'mlmesh_rpc_requests_total{code="OK",method="/mlmesh.registry.v1.RegistryService/GetModel",service="chassis-test"}'
        in text
    )
    assert 'code="NOT_FOUND"' in text


async def test_json_logs_carry_trace_and_request_ids(served):
    _, _, stub = served
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter("chassis-test"))
    logging.getLogger("test").addHandler(handler)
    logging.getLogger("test").setLevel(logging.INFO)
    try:
        await stub.GetModel(
            rpc.GetModelRequest(name="ok"),
            metadata=[
                ("x-request-id", "req-4"),
                ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),
            ],
        )
    finally:
        logging.getLogger("test").removeHandler(handler)
    entry = json.loads(buffer.getvalue().strip().splitlines()[-1])
    assert entry["msg"] == "handled"
    assert entry["trace_id"] == TRACE_ID and entry["request_id"] == "req-4"
    assert entry["service"] == "chassis-test"


async def test_graceful_shutdown_goes_not_serving_before_stopping():
    def register(server):
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(Double(), server)
        return ["mlmesh.registry.v1.RegistryService"]

    host = await start_service(
        Settings(port=0, metrics_port=-1, drain_seconds=0.5),
        register,
        error_domain="mlmesh.test",
        key_view=KeyView(),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "mlmesh.registry.v1.RegistryService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        shutdown = asyncio.create_task(host.shutdown())
        await asyncio.sleep(0.2)  # inside the drain window: still answering, NOT_SERVING
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="mlmesh.registry.v1.RegistryService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await shutdown
        await expect_error(
            health.Check(health_pb2.HealthCheckRequest(), timeout=1), grpc.StatusCode.UNAVAILABLE
        )


def test_settings_from_env_and_toml(tmp_path, monkeypatch):
    class FileSettings(ServiceSettings):
        model_config = {**ServiceSettings.model_config, "env_prefix": "MLMESH_CT_"}

    config = tmp_path / "c.toml"
    config.write_text('port = 7000\nlog_level = "DEBUG"\n')
    monkeypatch.setenv("MLMESH_CT_CONFIG_FILE", str(config))
    monkeypatch.setenv("MLMESH_CT_PORT", "7001")
    settings = FileSettings()
    assert settings.port == 7001  # the environment wins over the file
    assert settings.log_level == "DEBUG"
    monkeypatch.setenv("MLMESH_CT_CONFIG_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError):
        FileSettings()

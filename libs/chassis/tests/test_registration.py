"""Service registrations: the start order, the route table every service
checks scopes with, and the ready hook of start_service."""

from __future__ import annotations

import asyncio
import sys
from typing import ClassVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlmesh.batch.v1 import batch_service_pb2
from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh.registry.v1 import registry_service_pb2_grpc
from mlmesh_chassis.auth import KeyView, scopes_for
from mlmesh_chassis.config import ServiceSettings
from mlmesh_chassis.registration import (
    ServiceRegistration,
    key_directory_service,
    registrations,
    route,
    route_table,
    start_order,
)
from mlmesh_chassis.server import start_service

BATCH = batch_service_pb2.DESCRIPTOR.services_by_name["BatchService"]


def registration(name: str, **fields) -> ServiceRegistration:  # type: ignore[no-untyped-def]
    return ServiceRegistration(
        **{
            "name": name,
            "command": lambda ctx, port: [sys.executable, "-m", f"mlmesh_{name}"],
            "services": lambda: [],
            "env_prefix": f"MLMESH_{name.upper()}_",
            **fields,
        }
    )


def test_installed_services_start_in_their_declared_order():
    names = [r.name for r in registrations()]
    assert names == [
        "features",
        "flink",
        "registry",
        "llm",
        "vllmopenai",  # started in the background as soon as the llm is up
        "review",
        "monitor",  # after review: it submits low-confidence predictions there
        "triton",
        "deployer",
        "gateway",
        "batch",
        "vectors",
    ]
    assert key_directory_service() == "gateway"


def test_every_method_a_registered_service_serves_has_a_scope_policy():
    """A service that forgot its routes would refuse every call (deny by default)."""
    for registration in registrations():
        for service in (*registration.services(), *registration.unrouted_services()):
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                assert scopes_for(path) is not None, (registration.name, path)


def test_start_order_follows_after_then_names():
    found = [
        registration("gateway", after=("registry", "llm")),
        registration("llm", after=("registry",)),
        registration("batch", after=("gateway",)),
        registration("registry"),
        registration("features"),
    ]
    assert [r.name for r in start_order(found)] == [
        "features",
        "registry",
        "llm",
        "gateway",
        "batch",
    ]
    # A service it starts after that is not there does not hold it back.
    assert [r.name for r in start_order([registration("llm", after=("registry",))])] == ["llm"]


@pytest.mark.parametrize(
    ("found", "message"),
    [
        ([registration("a", after=("b",)), registration("b", after=("a",))], "cycle"),
        ([registration("a"), registration("a")], "registered twice"),
        (
            [registration("a", key_directory=True), registration("b", key_directory=True)],
            "more than one",
        ),
        (
            [
                registration("a", routes=(route("/mlmesh.a.", set()),)),
                registration("b", routes=(route("/mlmesh.a.v1.B/", set()),)),
            ],
            "covers",
        ),
    ],
)
def test_inconsistent_registrations_are_refused(found, message):
    with pytest.raises(ValueError, match=message):
        start_order(found)


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "Registry"},
        {"name": "../etc"},
        {"name": "x" * 40},
        {"name": "ok", "env_prefix": "REGISTRY_"},
        {"name": "ok", "env_prefix": "MLMESH_OK"},
    ],
)
def test_names_and_env_prefixes_are_checked(fields):
    with pytest.raises(ValueError):
        ServiceRegistration(
            command=lambda ctx, port: [],
            services=lambda: [],
            **{"env_prefix": "MLMESH_OK_", **fields},
        )
    with pytest.raises(ValueError, match="not an mlmesh"):
        route("/grpc.health.v1.Health/", set())


def test_a_new_service_gets_its_scopes_from_its_registration():
    """A service with no registration (the mesh without batch's) is refused;
    once its registration names its scope, that scope, and only it, may call it."""
    method = f"/{BATCH.full_name}/{BATCH.methods[0].name}"
    others = [r for r in registrations() if r.name != "batch"]
    assert scopes_for(method, route_table(others)) is None
    batch = registration(
        "batch",
        services=lambda: [BATCH],
        routes=(route("/mlmesh.batch.", {S.PLATFORM_SERVICE_BATCH}),),
    )
    table = route_table([*others, batch])
    assert scopes_for(method, table) == {S.PLATFORM_SERVICE_BATCH}
    # Read-only methods get the read scopes, others the write scopes.
    read = "/mlmesh.registry.v1.RegistryService/ListModels"
    write = "/mlmesh.registry.v1.RegistryService/CreateModel"
    assert scopes_for(read, table) == {
        S.PLATFORM_SERVICE_REGISTRY,
        S.PLATFORM_SERVICE_REGISTRY_READ,
    }
    assert scopes_for(write, table) == {S.PLATFORM_SERVICE_REGISTRY}


class Settings(ServiceSettings):
    service_name: ClassVar[str] = "ready-test"


async def _status(channel: grpc.aio.Channel, name: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=name), timeout=2
    )
    return int(reply.status)


async def test_ready_hook_holds_health_at_not_serving_until_it_returns():
    name = "mlmesh.registry.v1.RegistryService"

    def register(server):  # type: ignore[no-untyped-def]
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(
            registry_service_pb2_grpc.RegistryServiceServicer(), server
        )
        return [name]

    loaded = asyncio.Event()
    host = await start_service(
        Settings(port=0, metrics_port=-1, drain_seconds=0),
        register,
        error_domain="mlmesh.test",
        ready=loaded.wait,
        key_view=KeyView(),
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            for service in ("", name):
                assert await _status(channel, service) == health_pb2.HealthCheckResponse.NOT_SERVING
            loaded.set()
            for _ in range(100):
                if await _status(channel, name) == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.01)
            for service in ("", name):
                assert await _status(channel, service) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await host.shutdown()


async def test_a_failing_ready_hook_leaves_the_service_not_serving(caplog):
    async def never() -> None:
        raise RuntimeError("the model did not load")

    host = await start_service(
        Settings(port=0, metrics_port=-1, drain_seconds=0),
        lambda server: ["mlmesh.test.v1.Nothing"],
        error_domain="mlmesh.test",
        ready=never,
        key_view=KeyView(),
    )
    try:
        await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            assert await _status(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "not ready" in caplog.text
    finally:
        await host.shutdown()


async def test_http_readiness_is_a_200_on_loopback():
    """What the runner asks of programs without grpc.health (vLLM's server,
    the Flink supervisor)."""
    import asyncio

    from mlmesh_chassis.registration import http_ok

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        status = b"200 OK" if line.startswith(b"GET /health ") else b"404 Not Found"
        writer.write(b"HTTP/1.0 " + status + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    assert await http_ok(port, "/health")
    assert not await http_ok(port, "/other")
    server.close()
    await server.wait_closed()
    assert not await http_ok(port, "/health")  # nothing listens

"""Every call's caller checked in process, against a real grpc.aio server:
no key, a bad key, a key without the scope, a key revoked or rotated while
its streams are open, bad protobuf bytes, a client gone mid-stream."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import ClassVar

import grpc
import pytest
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import key_directory_service_pb2 as kd
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh.registry.v1 import registry_service_pb2_grpc
from mlmesh_chassis import auth
from mlmesh_chassis.auth import KeyView, current_principal
from mlmesh_chassis.config import ServiceSettings
from mlmesh_chassis.errors import Reason, Unauthenticated
from mlmesh_chassis.server import start_service
from mlmesh_chassis.testing import bearer_metadata, directory_key, expect_error


class Settings(ServiceSettings):
    service_name: ClassVar[str] = "auth-test"


class Streams(registry_service_pb2_grpc.RegistryServiceServicer):
    """A registry double with an endless server stream and a client stream."""

    def __init__(self) -> None:
        self.actors: list[str] = []

    async def GetModel(self, request, context):
        self.actors.append(current_principal().actor)
        return rpc.GetModelResponse()

    async def CreateModel(self, request, context):
        return rpc.CreateModelResponse()

    async def WatchEvents(self, request, context):
        while True:
            yield rpc.WatchEventsResponse()
            await asyncio.sleep(0.05)

    async def UploadModelVersion(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        return rpc.UploadModelVersionResponse()


@pytest.fixture(scope="module")
async def server():
    view = KeyView()
    view.replace([], 0)  # loaded, empty
    double = Streams()

    def register(server):
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(double, server)
        return ["mlmesh.registry.v1.RegistryService"]

    host = await start_service(
        Settings(port=0, metrics_port=-1, drain_seconds=0),
        register,
        error_domain="mlmesh.test",
        key_view=view,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        yield view, double, registry_service_pb2_grpc.RegistryServiceStub(channel), channel
    await host.shutdown()


def _grant(view: KeyView, *services: int) -> tuple[kd.DirectoryKey, str]:
    entry, secret = directory_key(list(services), revision=view.revision + 1)
    view.apply([entry], entry.revision)
    return entry, secret


def _revoke(view: KeyView, entry: kd.DirectoryKey) -> None:
    changed = kd.DirectoryKey()
    changed.CopyFrom(entry)
    changed.key.state = pb.KEY_STATE_REVOKED
    changed.revision = view.revision + 1
    view.apply([changed], changed.revision)


async def test_calls_without_a_valid_key_are_unauthenticated(server):
    view, _, stub, _ = server
    request = rpc.GetModelRequest(name="mm")
    details = await expect_error(stub.GetModel(request), grpc.StatusCode.UNAUTHENTICATED)
    assert details.error_info.reason == "API_KEY_MISSING"
    assert "authorization: Bearer" in details.message
    for bad in ("nope", "mlm_0123456789abcdef_" + "A" * 32, "mlm_XYZ_" + "A" * 30, "x" * 5000):
        refused = await expect_error(
            stub.GetModel(request, metadata=bearer_metadata(bad)), grpc.StatusCode.UNAUTHENTICATED
        )
        assert refused.error_info.reason == "API_KEY_INVALID"
    _, secret = _grant(view, pb.PLATFORM_SERVICE_REGISTRY)
    # A valid key with a trailing newline is not that key.
    await expect_error(
        stub.GetModel(request, metadata=(("authorization", f"Bearer {secret}x"),)),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_scopes_are_checked_per_method_and_read_only_calls(server):
    view, double, stub, _ = server
    entry, secret = _grant(view, pb.PLATFORM_SERVICE_REGISTRY_READ)
    await stub.GetModel(rpc.GetModelRequest(name="mm"), metadata=bearer_metadata(secret))
    assert double.actors[-1] == f"key:{entry.key.id}"
    details = await expect_error(
        stub.CreateModel(rpc.CreateModelRequest(), metadata=bearer_metadata(secret)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert details.error_info.metadata["key_id"] == entry.key.id
    _, generate_only = _grant(view, pb.PLATFORM_SERVICE_GENERATE)
    await expect_error(
        stub.GetModel(rpc.GetModelRequest(name="mm"), metadata=bearer_metadata(generate_only)),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_a_key_that_arrives_while_its_first_call_waits_is_accepted(server):
    # CreateKey returns before every service's view holds the key: the call
    # waits for the view's next changes instead of being refused.
    view, double, stub, _ = server
    entry, secret = directory_key([pb.PLATFORM_SERVICE_REGISTRY], revision=view.revision + 1)
    call = stub.GetModel(rpc.GetModelRequest(name="mm"), metadata=bearer_metadata(secret))
    await asyncio.sleep(0.2)
    _grant(view, pb.PLATFORM_SERVICE_REGISTRY)  # another key first: still waiting
    await asyncio.sleep(0.1)
    view.apply([entry], view.revision + 1)
    await call
    assert double.actors[-1] == f"key:{entry.key.id}"


async def test_an_unknown_key_is_refused_after_a_bounded_wait(server, monkeypatch):
    view, _, stub, _ = server
    monkeypatch.setattr(auth, "UNKNOWN_KEY_WAIT_S", 0.3)
    _, unknown = directory_key([pb.PLATFORM_SERVICE_REGISTRY])
    started = time.monotonic()
    details = await expect_error(
        stub.GetModel(rpc.GetModelRequest(name="mm"), metadata=bearer_metadata(unknown)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert details.error_info.reason == "API_KEY_INVALID"
    assert 0.3 <= time.monotonic() - started < 5
    # A wrong secret for a key the view holds is refused at once.
    entry, _ = _grant(view, pb.PLATFORM_SERVICE_REGISTRY)
    _, other = directory_key([pb.PLATFORM_SERVICE_REGISTRY])
    wrong = f"mlm_{entry.key.id}_{other.rsplit('_', 1)[1]}"
    started = time.monotonic()
    await expect_error(
        stub.GetModel(rpc.GetModelRequest(name="mm"), metadata=bearer_metadata(wrong)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert time.monotonic() - started < 0.25


async def test_a_flood_of_made_up_key_ids_parks_a_bounded_number_of_calls(monkeypatch):
    monkeypatch.setattr(auth, "MAX_UNKNOWN_KEY_WAITERS", 3)
    view = KeyView()
    view.replace([], 0)
    waiting = [asyncio.ensure_future(view.wait_for_key(f"{i:016x}")) for i in range(3)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiting)
    started = time.monotonic()
    await view.wait_for_key("f" * 16)  # the fourth is not parked
    assert time.monotonic() - started < 0.05
    for w in waiting:
        w.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert view._waiting == 0


async def test_a_view_not_loaded_yet_answers_unavailable_with_retry_info():
    view = KeyView()

    def register(server):
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(Streams(), server)
        return ["mlmesh.registry.v1.RegistryService"]

    host = await start_service(
        Settings(port=0, metrics_port=-1, drain_seconds=0),
        register,
        error_domain="mlmesh.test",
        key_view=view,
    )
    entry, secret = directory_key([pb.PLATFORM_SERVICE_REGISTRY])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            details = await expect_error(
                stub.GetModel(rpc.GetModelRequest(name="mm"), metadata=bearer_metadata(secret)),
                grpc.StatusCode.UNAVAILABLE,
            )
            assert details.retry_info is not None
            view.seed([entry])  # a bootstrap key works before the first snapshot
            await stub.GetModel(rpc.GetModelRequest(name="mm"), metadata=bearer_metadata(secret))
    finally:
        await host.shutdown()


async def test_revoking_a_key_ends_its_open_server_stream_within_a_second(server):
    view, _, stub, _ = server
    entry, secret = _grant(view, pb.PLATFORM_SERVICE_REGISTRY)
    _, other = _grant(view, pb.PLATFORM_SERVICE_REGISTRY)
    call = stub.WatchEvents(rpc.WatchEventsRequest(), metadata=bearer_metadata(secret))
    survivor = stub.WatchEvents(rpc.WatchEventsRequest(), metadata=bearer_metadata(other))
    await call.read()
    await survivor.read()
    loop = asyncio.get_running_loop()
    revoked_at = loop.time()
    _revoke(view, entry)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            await call.read()
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in ended.value.details()
    assert loop.time() - revoked_at < 1.0
    await survivor.read()  # another key's stream goes on
    survivor.cancel()


async def test_revoking_a_key_ends_its_open_upload(server):
    view, _, stub, _ = server
    entry, secret = _grant(view, pb.PLATFORM_SERVICE_REGISTRY)
    stop = asyncio.Event()

    async def chunks():
        yield rpc.UploadModelVersionRequest()
        await stop.wait()

    upload = stub.UploadModelVersion(chunks(), metadata=bearer_metadata(secret))
    await asyncio.sleep(0.2)
    _revoke(view, entry)
    await expect_error(upload, grpc.StatusCode.UNAUTHENTICATED)
    stop.set()


async def test_a_rotated_secret_works_until_its_grace_ends_then_its_stream_ends(server):
    view, _, stub, _ = server
    entry, old = _grant(view, pb.PLATFORM_SERVICE_REGISTRY)
    rotated, new = directory_key([pb.PLATFORM_SERVICE_REGISTRY], key_id=entry.key.id)
    grace = rotated.grace_secrets.add(secret_sha256=entry.secret_sha256)
    grace.expire_time.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5))
    rotated.revision = view.revision + 1
    view.apply([rotated], rotated.revision)
    call = stub.WatchEvents(rpc.WatchEventsRequest(), metadata=bearer_metadata(old))
    await call.read()
    await stub.GetModel(rpc.GetModelRequest(name="mm"), metadata=bearer_metadata(new))
    await asyncio.sleep(0.5)
    await call.read()  # still in its grace
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        for _ in range(100):
            await call.read()
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await expect_error(
        stub.GetModel(rpc.GetModelRequest(name="mm"), metadata=bearer_metadata(old)),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_invalid_protobuf_bytes_are_invalid_argument(server):
    view, _, _, channel = server
    _, secret = _grant(view, pb.PLATFORM_SERVICE_REGISTRY)
    raw = channel.unary_unary(
        "/mlmesh.registry.v1.RegistryService/GetModel",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    # field 1 (name, a string) holding invalid UTF-8
    details = await expect_error(
        raw(b"\x0a\x02\xff\xfe", metadata=bearer_metadata(secret)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.bad_request is not None
    # Undecodable bytes are refused before the key check matters too.
    await expect_error(raw(b"\x0a\x02\xff\xfe"), grpc.StatusCode.UNAUTHENTICATED)


async def test_a_client_gone_mid_stream_leaves_no_errors_in_the_log(server, caplog):
    view, _, stub, _ = server
    _, secret = _grant(view, pb.PLATFORM_SERVICE_REGISTRY)
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        call = stub.WatchEvents(rpc.WatchEventsRequest(), metadata=bearer_metadata(secret))
        await call.read()
        call.cancel()
    await asyncio.sleep(0.3)
    text = caplog.text
    assert "Failed to detach context" not in text
    assert "never retrieved" not in text
    assert "Traceback" not in text


async def test_bad_keys_leave_nothing_behind(server):
    """Checks keep no per-secret cache: a flood of distinct bad keys grows no
    state (the gateway's old auth cache kept one entry per bad key), and parks
    at most MAX_UNKNOWN_KEY_WAITERS calls for about UNKNOWN_KEY_WAIT_S."""
    view, _, stub, _ = server
    callers_before = len(view)
    started = time.monotonic()
    await asyncio.gather(
        *(
            expect_error(
                stub.GetModel(
                    rpc.GetModelRequest(name="mm"),
                    metadata=bearer_metadata(f"mlm_{i:016x}_" + "B" * 32),
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
            for i in range(300)
        )
    )
    assert time.monotonic() - started < auth.UNKNOWN_KEY_WAIT_S + 10
    assert len(view) == callers_before
    assert view._waiting == 0


def test_a_time_no_datetime_holds_counts_as_expired_and_never_breaks_the_view():
    entry, secret = directory_key([pb.PLATFORM_SERVICE_REGISTRY])
    entry.key.expire_time.seconds = 10**12  # past year 9999
    good, good_secret = directory_key([pb.PLATFORM_SERVICE_REGISTRY])
    view = KeyView()
    view.replace([entry, good], 2)
    with pytest.raises(Unauthenticated, match="expired"):
        view.verify(secret)
    assert view.verify(good_secret).key_id == good.key.id


def test_an_older_snapshot_never_undoes_a_newer_change():
    entry, secret = directory_key([pb.PLATFORM_SERVICE_REGISTRY], revision=5)
    view = KeyView()
    view.replace([entry], 5)
    _revoke(view, entry)  # revision 6
    view.replace([entry], 5)  # a lagging gateway replica's snapshot
    with pytest.raises(Unauthenticated, match="revoked") as refused:
        view.verify(secret)
    assert refused.value.reason == Reason.ERROR_REASON_API_KEY_REVOKED
    assert view.revision == 6

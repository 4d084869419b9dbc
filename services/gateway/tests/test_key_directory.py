"""The key directory and a service's watcher, over real gRPC: changes reach a
service's view at once, a service keeps serving from its view while the
gateway is away, and a revocation made meanwhile applies on reconnect."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import ClassVar

import grpc
import pytest
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import key_directory_service_pb2 as kd
from mlmesh.gateway.v1 import key_directory_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh_chassis import validation
from mlmesh_chassis.auth import KeyView, KeyWatcher, ServiceIdentity
from mlmesh_chassis.config import ServiceSettings
from mlmesh_chassis.errors import FailedPrecondition, Unauthenticated
from mlmesh_chassis.server import start_service
from mlmesh_chassis.testing import directory_key, keyed_channel
from mlmesh_gateway.key_directory import CATCH_UP_S, KeyDirectory, KeyDirectoryServicer
from mlmesh_gateway.keys import KeyStore


class Settings(ServiceSettings):
    service_name: ClassVar[str] = "keys-test"


@pytest.fixture
async def store(gateway_db):
    return KeyStore(gateway_db)


class Gateway:
    """The directory's server, stoppable and restartable on the same port."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.port = 0
        self.host = None
        self.directory: KeyDirectory | None = None

    async def start(self) -> None:
        self.directory = KeyDirectory(self.store, KeyView(), poll_seconds=0.1)
        await self.directory.start()
        directory = self.directory

        def register(server):
            key_directory_service_pb2_grpc.add_KeyDirectoryServiceServicer_to_server(
                KeyDirectoryServicer(directory), server
            )
            return ["mlmesh.gateway.v1.KeyDirectoryService"]

        self.host = await start_service(
            Settings(port=self.port, metrics_port=-1, drain_seconds=0, grace_seconds=0),
            register,
            error_domain="mlmesh.test",
            key_view=self.directory.view,
        )
        self.port = self.host.port

    async def stop(self) -> None:
        await self.directory.close()
        await self.host.shutdown()


async def _until(condition, within: float = 1.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within, "not within the time allowed"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def _service_key(store: KeyStore, tmp_path) -> ServiceIdentity:
    _, secret = await store.create(
        pb.Key(
            display_name="service registry",
            scopes=pb.KeyScopes(services=[pb.PLATFORM_SERVICE_KEY_DIRECTORY]),
        )
    )
    (tmp_path / "registry.key").write_text(secret)
    return ServiceIdentity(tmp_path / "registry.key")


async def test_a_service_follows_the_directory_and_survives_the_gateway_away(store, tmp_path):
    identity = await _service_key(store, tmp_path)
    gateway = Gateway(store)
    await gateway.start()
    view = KeyView()
    watcher = KeyWatcher(view, lambda: f"127.0.0.1:{gateway.port}", identity)
    task = asyncio.create_task(watcher.run())
    try:
        await _until(lambda: view.synced)
        key, secret = await store.create(pb.Key(display_name="app"))
        await gateway.directory.refresh()
        await _until(lambda: view.get(key.id) is not None, 1.0)
        assert view.verify(secret).key_id == key.id

        # The gateway goes away: the service keeps verifying from its view.
        await gateway.stop()
        await asyncio.sleep(0.3)
        assert view.verify(secret).key_id == key.id
        # Revoked while the service cannot hear (another replica, say).
        await store.revoke(key.id, "compromised")
        fresh, fresh_secret = await store.create(pb.Key(display_name="new"))
        assert view.verify(secret).key_id == key.id
        await gateway.start()  # the same port
        took = await _until(lambda: view.get(fresh.id) is not None, 3.0)
        with pytest.raises(Unauthenticated, match="revoked"):
            view.verify(secret)
        assert view.verify(fresh_secret).key_id == fresh.id
        assert took < 3.0
    finally:
        task.cancel()
        await gateway.stop()


async def test_a_watcher_without_the_scope_is_refused(store, tmp_path):
    _, secret = await store.create(pb.Key(display_name="app"))
    (tmp_path / "app.key").write_text(secret)
    gateway = Gateway(store)
    await gateway.start()
    view = KeyView()
    watcher = KeyWatcher(
        view, lambda: f"127.0.0.1:{gateway.port}", ServiceIdentity(tmp_path / "app.key")
    )
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.sleep(0.5)
        assert not view.synced
        # The watcher did reach the directory: the same call with the app key
        # is refused for its scope, not for want of a server.
        async with keyed_channel(f"127.0.0.1:{gateway.port}", secret) as channel:
            stub = key_directory_service_pb2_grpc.KeyDirectoryServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                await stub.WatchKeys(kd.WatchKeysRequest()).read()
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        task.cancel()
        await gateway.stop()


async def test_rotating_twice_keeps_the_first_secrets_grace(store):
    key, first = await store.create(pb.Key(display_name="app"))
    await store.rotate(key.id, dt.timedelta(hours=1))
    _, third = await store.rotate(key.id, dt.timedelta(seconds=0))
    view = KeyView()
    view.replace((await store.changes_since(0))[0], 1)
    assert view.verify(first).key_id == key.id  # its hour is not cut short
    assert view.verify(third).key_id == key.id
    for _ in range(7):  # eight secrets in their grace at once, at most
        await store.rotate(key.id, dt.timedelta(hours=1))
    with pytest.raises(FailedPrecondition):
        await store.rotate(key.id, dt.timedelta(hours=1))
    await store.revoke(key.id, "done")
    view.replace((await store.changes_since(0))[0], 2)
    with pytest.raises(Unauthenticated):
        view.verify(first)


async def test_a_bootstrap_key_is_added_once_and_never_revived(store):
    entry, secret = directory_key([pb.PLATFORM_SERVICE_ADMIN])
    assert await store.ensure(entry)
    assert not await store.ensure(entry)
    await store.revoke(entry.key.id, "rotated out")
    assert not await store.ensure(entry)
    entries, _ = await store.changes_since(0)
    view = KeyView()
    view.replace(entries, 1)
    with pytest.raises(Unauthenticated, match="revoked"):
        view.verify(secret)
    assert kd.DirectoryKey in {type(e) for e in entries}


async def test_a_key_made_on_another_replica_works_here_at_once(store, tmp_path):
    replica = Gateway(store)
    await replica.start()
    replica.directory.poll_seconds = 60  # no help from polling
    try:
        _, secret = await store.create(  # as another replica would
            pb.Key(
                display_name="new",
                scopes=pb.KeyScopes(services=[pb.PLATFORM_SERVICE_KEY_DIRECTORY]),
            )
        )
        async with keyed_channel(f"127.0.0.1:{replica.port}", secret) as channel:
            stub = key_directory_service_pb2_grpc.KeyDirectoryServiceStub(channel)
            call = stub.WatchKeys(kd.WatchKeysRequest())
            first = await call.read()
            assert first.snapshot
            call.cancel()
    finally:
        await replica.stop()


async def test_a_key_expiring_past_year_9999_is_refused(store):
    """CreateKeyRequest's rule (the chassis checks it before the store)."""
    key = pb.Key(display_name="far")
    key.expire_time.seconds = 10**12
    refused = validation.violations_of(keys_rpc.CreateKeyRequest(key=key))
    assert [v.field for v in refused] == ["key.expire_time"]


async def test_a_flood_of_unknown_keys_reads_the_store_boundedly_and_grows_nothing(store, tmp_path):
    """Each unknown key makes the gateway look in its store (another replica
    may have made it a moment ago), but callers share one read and reads are
    at most one per CATCH_UP_S: 300 distinct bad keys neither cost 300 store
    reads nor leave 300 entries behind (the old auth cache kept one each)."""
    replica = Gateway(store)
    await replica.start()
    replica.directory.poll_seconds = 60  # only catch-up reads count below
    reads = 0
    real_changes_since = store.changes_since

    async def counting(revision):
        nonlocal reads
        reads += 1
        return await real_changes_since(revision)

    store.changes_since = counting
    try:
        keys_before = len(replica.directory.view)
        started = time.monotonic()

        async def bad_call(i: int) -> None:
            secret = f"mlm_{i:016x}_" + "B" * 32
            async with keyed_channel(f"127.0.0.1:{replica.port}", secret) as channel:
                stub = key_directory_service_pb2_grpc.KeyDirectoryServiceStub(channel)
                call = stub.WatchKeys(kd.WatchKeysRequest())
                with pytest.raises(grpc.RpcError) as caught:
                    await call.read()
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

        await asyncio.gather(*(bad_call(i) for i in range(300)))
        elapsed = time.monotonic() - started
        assert len(replica.directory.view) == keys_before
        assert len(replica.directory._entries) == keys_before
        # one read per CATCH_UP_S window at most, plus one in flight
        assert reads <= elapsed / CATCH_UP_S + 2, (reads, elapsed)
        assert reads < 300
    finally:
        store.changes_since = real_changes_since
        await replica.stop()

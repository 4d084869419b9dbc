"""ModelDirectory: one follower per reference asked for, started only once a
first read proved the reference exists, bounded in number, stopped at close."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from mlmesh.registry.v1.model_pb2 import ModelVersion
from mlmesh_gateway import directory as directory_module
from mlmesh_gateway.directory import ModelDirectory
from mlmesh_serving import ServedVersions


class Registry:
    """Reads and followers of a registry that knows ``known`` models."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.reads: list[str] = []
        self.following: set[str] = set()
        self.moves: dict[str, asyncio.Queue[int]] = {}

    async def read(self, _client, reference) -> ServedVersions:
        self.reads.append(reference.model)
        if reference.model not in self.known:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "no model"
            )
        return served(reference.model, 1)

    async def follow(self, _target, reference, same):
        model = reference.model
        self.following.add(model)
        moves = self.moves.setdefault(model, asyncio.Queue())
        try:
            while True:
                yield served(model, await moves.get())
        finally:
            self.following.discard(model)


def served(model: str, version: int) -> ServedVersions:
    return ServedVersions(ModelVersion(model=model, version=version), frozenset())


@pytest.fixture
async def registry(monkeypatch):
    fake = Registry({"a", "b", "c"})
    monkeypatch.setattr(directory_module, "read_served_versions", fake.read)

    async def no_client(self):
        return None

    monkeypatch.setattr(ModelDirectory, "_registry", no_client)
    return fake


async def test_a_follower_per_reference_keeps_it_current(registry):
    directory = ModelDirectory("registry:1", follow=registry.follow)
    assert (await directory.served("a", "champion")).served.version == 1
    await asyncio.sleep(0)
    assert registry.following == {"a"}
    registry.moves["a"].put_nowait(5)  # the alias moved
    await asyncio.sleep(0.01)
    assert (await directory.served("a", "champion")).served.version == 5
    assert registry.reads == ["a"]  # read once; the follower did the rest
    await directory.close()
    assert registry.following == set()


async def test_an_unknown_model_starts_no_follower(registry):
    directory = ModelDirectory("registry:1", follow=registry.follow)
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            await directory.served("nope")
    await asyncio.sleep(0)
    assert registry.following == set() and directory._followed == {}
    await directory.close()


async def test_followers_are_bounded_least_recently_asked_first(registry):
    directory = ModelDirectory("registry:1", max_followed=2, follow=registry.follow)
    await directory.served("a")
    await directory.served("b")
    await directory.served("a")  # a was asked for last
    await directory.served("c")
    await asyncio.sleep(0.01)
    assert registry.following == {"a", "c"}
    await directory.close()


async def test_concurrent_first_requests_read_once(registry):
    directory = ModelDirectory("registry:1", follow=registry.follow)
    results = await asyncio.gather(*(directory.served("b") for _ in range(5)))
    assert {r.served.version for r in results} == {1} and registry.reads == ["b"]
    await directory.close()


async def test_reread_asks_the_registry_now(registry):
    directory = ModelDirectory("registry:1", follow=registry.follow)
    await directory.served("a")
    await directory.reread("a")
    assert registry.reads == ["a", "a"]
    await directory.close()

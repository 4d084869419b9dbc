"""The served-versions follower and the artifact cache against a real
registry (in process, port 0): what a reference holds now, after alias moves
and experiment changes, across a registry restart; atomic, bounded, evicted
downloads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from itertools import islice
from pathlib import Path

import pytest
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh_registry.testing import start_test_registry
from mlmesh_sdk.reference import parse_reference
from mlmesh_sdk.registry import RegistryClient
from mlmesh_sdk.snapshot import UnpackLimits, UnsafeArchiveError
from mlmesh_serving import ArtifactCache, ServedVersions, backoff_delays, follow_served
from mlmesh_serving import follower as follower_module
from mlmesh_serving.cache import COMPLETE


class Registry:
    """A real registry that a test can stop and start again on its port."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.host = None
        self.port = 0

    async def start(self) -> None:
        """Starts (again, on the same port and database); its key, new at
        each start, is what clients of this process send (MLMESH_API_KEY)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.host, secret = await start_test_registry(self.root, port=self.port)
        self.port = self.host.port
        self.monkeypatch.setenv("MLMESH_API_KEY", secret)

    async def stop(self) -> None:
        await self.host.shutdown()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Registry]:
    server = Registry(tmp_path / "registry", monkeypatch)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def versions_of(registry: Registry, model: str, count: int, tmp_path: Path) -> None:
    folder = tmp_path / "artifact"
    async with RegistryClient(registry.target) as client:
        for i in range(count):
            folder.mkdir(exist_ok=True)
            (folder / "weights.txt").write_text(f"version {i + 1}\n")
            await client.upload_folder(model, folder)


async def next_item(follower: AsyncIterator[ServedVersions], within: float = 5.0):
    return await asyncio.wait_for(anext(follower), within)


def as_tuple(item: ServedVersions) -> tuple[int, list[int]]:
    return item.served.version, sorted(item.experiments)


async def test_it_follows_alias_moves_and_experiments(registry: Registry, tmp_path: Path):
    await versions_of(registry, "mdl", 4, tmp_path)
    async with RegistryClient(registry.target) as client:
        await client.set_alias("mdl", "champion", 1)
        follower = follow_served(registry.target, parse_reference("mdl@champion"), 0.05)
        try:
            assert as_tuple(await next_item(follower)) == (1, [])
            await client.set_alias("mdl", "champion", 2)
            assert as_tuple(await next_item(follower)) == (2, [])
            # another alias does not concern m@champion: nothing is yielded for it
            await client.set_alias("mdl", "canary", 3)
            experiment = pb.Experiment(
                name="mdl-ab",
                model="mdl",
                arms=[
                    pb.ExperimentArm(name="control", version=2, weight=50),
                    pb.ExperimentArm(name="treatment", version=3, weight=50),
                ],
                shadow=pb.ShadowTraffic(version=4, percent=10),
            )
            await client.stub.CreateExperiment(
                rpc.CreateExperimentRequest(experiment=experiment), metadata=client.metadata
            )
            # arms and shadow, the served version left out
            assert as_tuple(await next_item(follower)) == (2, [3, 4])
            await client.stub.StopExperiment(
                rpc.StopExperimentRequest(name="mdl-ab"), metadata=client.metadata
            )
            assert as_tuple(await next_item(follower)) == (2, [])
        finally:
            await follower.aclose()


async def test_a_burst_of_moves_costs_few_reads_and_ends_on_the_last(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    await versions_of(registry, "mdl", 3, tmp_path)
    async with RegistryClient(registry.target) as client:
        for version in (1, 2, 3, 1, 2, 3, 1, 2, 3, 2):  # a history to replay on connect
            await client.set_alias("mdl", "champion", version)
    reads = 0
    read = follower_module.read_served_versions

    async def counted(*args):
        nonlocal reads
        reads += 1
        return await read(*args)

    monkeypatch.setattr(follower_module, "read_served_versions", counted)
    follower = follow_served(registry.target, parse_reference("mdl@champion"), 0.05)
    try:
        assert as_tuple(await next_item(follower)) == (2, [])
        with pytest.raises(TimeoutError):  # the replayed history yields nothing more
            await next_item(follower, within=0.5)
        assert 1 <= reads < 10  # not one read per replayed move
    finally:
        await follower.aclose()


async def test_a_change_made_while_the_registry_was_away_applies_on_return(
    registry: Registry, tmp_path: Path
):
    await versions_of(registry, "mdl", 2, tmp_path)
    async with RegistryClient(registry.target) as client:
        await client.set_alias("mdl", "champion", 1)
    follower = follow_served(registry.target, parse_reference("mdl@champion"), 0.05, 0.2)
    try:
        assert as_tuple(await next_item(follower)) == (1, [])
        await registry.stop()
        # the database outlives the server: move the alias with the server away
        await registry.start()
        async with RegistryClient(registry.target) as client:
            await client.set_alias("mdl", "champion", 2)
        assert as_tuple(await next_item(follower, within=10)) == (2, [])
    finally:
        await follower.aclose()


async def test_the_follower_waits_for_a_model_that_does_not_exist_yet(
    registry: Registry, tmp_path: Path
):
    follower = follow_served(registry.target, parse_reference("later@champion"), 0.05, 0.1)
    first = asyncio.ensure_future(next_item(follower, within=10))
    try:
        await asyncio.sleep(0.3)
        assert not first.done()  # NOT_FOUND is retried, not raised
        await versions_of(registry, "later", 1, tmp_path)
        async with RegistryClient(registry.target) as client:
            await client.set_alias("later", "champion", 1)
        assert as_tuple(await first) == (1, [])
    finally:
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await follower.aclose()


def test_backoff_doubles_up_to_its_cap() -> None:
    assert list(islice(backoff_delays(2.0), 10)) == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert list(islice(backoff_delays(1.0, 3.0), 4)) == [1, 2, 3, 3]


async def test_the_cache_downloads_once_atomically_and_evicts(registry: Registry, tmp_path: Path):
    await versions_of(registry, "mdl", 3, tmp_path)
    cache = ArtifactCache(tmp_path / "cache", registry.target)
    # many asking at once: one download, one complete folder
    folders = await asyncio.gather(*(cache.folder("mdl", 1) for _ in range(8)))
    assert len(set(folders)) == 1
    assert (folders[0] / "weights.txt").read_text() == "version 1\n"
    assert (folders[0] / COMPLETE).exists()
    await cache.folder("mdl", 2)
    await cache.folder("mdl", 3)
    assert await cache.retain("mdl", {3}) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "cache" / "mdl").iterdir()) == ["3"]


async def test_a_refused_download_leaves_nothing_that_looks_complete(
    registry: Registry, tmp_path: Path
):
    await versions_of(registry, "mdl", 1, tmp_path)
    cache = ArtifactCache(
        tmp_path / "cache", registry.target, UnpackLimits(max_members=10, max_total_bytes=4)
    )
    with pytest.raises(UnsafeArchiveError):
        await cache.folder("mdl", 1)
    assert not cache.holds("mdl", 1)
    left = list((tmp_path / "cache").rglob("*"))
    assert all(not p.is_file() for p in left), left  # at most empty folders


async def test_an_incomplete_folder_from_before_is_replaced(registry: Registry, tmp_path: Path):
    await versions_of(registry, "mdl", 1, tmp_path)
    cache = ArtifactCache(tmp_path / "cache", registry.target)
    stale = cache.path("mdl", 1)
    stale.mkdir(parents=True)
    (stale / "weights.txt").write_text("half a download\n")  # no COMPLETE marker
    folder = await cache.folder("mdl", 1)
    assert (folder / "weights.txt").read_text() == "version 1\n"

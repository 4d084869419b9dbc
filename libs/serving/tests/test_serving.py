"""The served-versions follower and the artifact cache against a real
registry (in process, port 0): what a reference holds now, after alias moves
and experiment changes, across a registry restart; atomic, bounded, evicted
downloads."""

from __future__ import annotations

import asyncio
import contextlib
import os
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
from mlmesh_serving import cache as cache_module
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


async def nothing_yet(follower: AsyncIterator[ServedVersions]) -> asyncio.Future[ServedVersions]:
    """The follower's next item, still pending after half a second (a
    timeout would cancel, and so end, the follower)."""
    pending = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0.5)
    assert not pending.done()
    return pending


async def test_events_missed_on_a_broken_stream_are_read_on_reconnect(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The stream loses events (they arrive, nobody hears them), then breaks:
    the reconnect reads everything and resumes the stream at its cursor."""
    await versions_of(registry, "mdl", 3, tmp_path)
    async with RegistryClient(registry.target) as client:
        await client.set_alias("mdl", "champion", 1)
    real_watch = follower_module._watch
    cut = asyncio.Event()
    resumed_after: list[int] = []

    async def watch(registry_client, reference, cursor, changed):
        resumed_after.append(cursor.after)
        if len(resumed_after) > 1:
            return await real_watch(registry_client, reference, cursor, changed)
        deaf = asyncio.ensure_future(
            real_watch(registry_client, reference, cursor, asyncio.Event())
        )
        try:
            await cut.wait()
        finally:
            deaf.cancel()
        raise ConnectionResetError("the stream broke")

    monkeypatch.setattr(follower_module, "_watch", watch)
    follower = follow_served(registry.target, parse_reference("mdl@champion"), 0.05)
    try:
        assert as_tuple(await next_item(follower)) == (1, [])
        async with RegistryClient(registry.target) as client:
            await client.set_alias("mdl", "champion", 2)
            await client.stub.CreateExperiment(
                rpc.CreateExperimentRequest(
                    experiment=pb.Experiment(
                        name="mdl-ab",
                        model="mdl",
                        arms=[
                            pb.ExperimentArm(name="control", version=2, weight=50),
                            pb.ExperimentArm(name="treatment", version=3, weight=50),
                        ],
                    )
                ),
                metadata=client.metadata,
            )
            pending = await nothing_yet(follower)  # missed
            cut.set()
            assert as_tuple(await asyncio.wait_for(pending, 5)) == (2, [3])
            assert len(resumed_after) == 2 and resumed_after[1] > 0  # at the cursor, not 0
            await client.set_alias("mdl", "champion", 3)  # the new stream is heard
            assert as_tuple(await next_item(follower)) == (3, [2])  # 3 is served, not an arm
    finally:
        await follower.aclose()


async def test_arms_added_and_removed_and_experiments_of_other_models(
    registry: Registry, tmp_path: Path
):
    await versions_of(registry, "mdl", 5, tmp_path)
    await versions_of(registry, "other", 2, tmp_path)
    async with RegistryClient(registry.target) as client:
        await client.set_alias("mdl", "champion", 1)

        async def create(name: str, model: str, *versions: int) -> None:
            arms = [pb.ExperimentArm(name=f"arm{v}", version=v, weight=50) for v in versions]
            experiment = pb.Experiment(name=name, model=model, arms=arms)
            await client.stub.CreateExperiment(
                rpc.CreateExperimentRequest(experiment=experiment), metadata=client.metadata
            )

        follower = follow_served(registry.target, parse_reference("mdl@champion"), 0.05)
        try:
            assert as_tuple(await next_item(follower)) == (1, [])
            await create("other-ab", "other", 1, 2)  # another model's: not followed
            pending = await nothing_yet(follower)
            await create("first", "mdl", 1, 2)
            assert as_tuple(await asyncio.wait_for(pending, 5)) == (1, [2])
            await create("second", "mdl", 3, 4)  # two experiments: the union
            assert as_tuple(await next_item(follower)) == (1, [2, 3, 4])
            # an arm removed, another added
            update = pb.Experiment(
                name="second",
                model="mdl",
                arms=[
                    pb.ExperimentArm(name="arm3", version=3, weight=50),
                    pb.ExperimentArm(name="arm5", version=5, weight=50),
                ],
            )
            request = rpc.UpdateExperimentRequest(experiment=update)
            request.update_mask.paths.append("arms")
            await client.stub.UpdateExperiment(request, metadata=client.metadata)
            assert as_tuple(await next_item(follower)) == (1, [2, 3, 5])
            await client.stub.StopExperiment(
                rpc.StopExperimentRequest(name="first"), metadata=client.metadata
            )
            assert as_tuple(await next_item(follower)) == (1, [3, 5])
        finally:
            await follower.aclose()


async def test_eviction_keeps_the_cache_to_what_is_held(registry: Registry, tmp_path: Path):
    await versions_of(registry, "mdl", 5, tmp_path)
    await versions_of(registry, "other", 1, tmp_path)
    cache = ArtifactCache(tmp_path / "cache", registry.target)
    await cache.folder("other", 1)
    model_dir = tmp_path / "cache" / "mdl"
    for version in range(1, 6):  # an alias moving along: one folder at a time, never more
        await cache.folder("mdl", version)
        await cache.retain("mdl", {version})
        assert sorted(p.name for p in model_dir.iterdir()) == [str(version)]
    # another replica's download in progress is not a version: left alone
    (model_dir / ".2.partial-999999").mkdir()
    assert await cache.retain("mdl", {1}) == [5]
    assert sorted(p.name for p in model_dir.iterdir()) == [".2.partial-999999"]
    assert cache.holds("other", 1)  # another model's versions are its own business
    assert await cache.retain("never-cached", set()) == []


async def test_a_download_lands_under_its_name_only_when_complete(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    await versions_of(registry, "mdl", 1, tmp_path)
    cache = ArtifactCache(tmp_path / "cache", registry.target)
    final = cache.path("mdl", 1)
    seen: list[tuple[str, bool, bool, str]] = []
    move = cache_module._move_into_place

    def observed(partial: Path, folder: Path) -> None:
        seen.append(
            (
                partial.name,
                folder.exists(),
                (partial / COMPLETE).exists(),
                (partial / "weights.txt").read_text(),
            )
        )
        move(partial, folder)

    monkeypatch.setattr(cache_module, "_move_into_place", observed)
    await cache.folder("mdl", 1)
    [(name, final_existed, complete, weights)] = seen
    assert name.startswith(f".1.partial-{os.getpid()}-")  # this download's own folder
    assert (final_existed, complete, weights) == (False, True, "version 1\n")
    assert sorted(p.name for p in final.parent.iterdir()) == ["1"]  # nothing left beside it


async def test_a_replica_that_finished_first_keeps_its_folder(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    await versions_of(registry, "mdl", 1, tmp_path)
    cache = ArtifactCache(tmp_path / "cache", registry.target)
    move = cache_module._move_into_place

    def another_replica_first(partial: Path, folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "weights.txt").write_text("the other replica's\n")
        (folder / COMPLETE).touch()
        move(partial, folder)

    monkeypatch.setattr(cache_module, "_move_into_place", another_replica_first)
    folder = await cache.folder("mdl", 1)
    assert (folder / "weights.txt").read_text() == "the other replica's\n"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["1"]


async def test_two_caches_on_one_folder_in_one_process_download_side_by_side(
    registry: Registry, tmp_path: Path
):
    await versions_of(registry, "mdl", 1, tmp_path)
    first = ArtifactCache(tmp_path / "cache", registry.target)
    second = ArtifactCache(tmp_path / "cache", registry.target)
    folders = await asyncio.gather(first.folder("mdl", 1), second.folder("mdl", 1))
    assert folders[0] == folders[1]
    assert (folders[0] / "weights.txt").read_text() == "version 1\n"
    assert sorted(p.name for p in folders[0].parent.iterdir()) == ["1"]

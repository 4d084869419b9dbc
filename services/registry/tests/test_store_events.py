"""The event log: one sequence for every alias and experiment change, read
from any point on and then live (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh_registry.store import RegistryStore
from registry_fixtures import add_version

Event = pb.AliasEvent | pb.ExperimentEvent


def _model(event: Event) -> str:
    return event.experiment.model if isinstance(event, pb.ExperimentEvent) else event.model


async def _take(events: AsyncGenerator[Event, None], count: int) -> list[Event]:
    return [await asyncio.wait_for(anext(events), 5) for _ in range(count)]


async def _changes(store: RegistryStore, model: str) -> None:
    """Three alias events and one experiment event, interleaved."""
    for data in (b"one", b"two"):
        await add_version(store, model, data)
    await store.aliases.set(model, "live", 1, "", "ci", None)
    await store.experiments.create(
        pb.Experiment(
            name=model, model=model, arms=[pb.ExperimentArm(name="a", version=1, weight=100)]
        )
    )
    await store.aliases.set(model, "live", 2, "", "ci", None)
    await store.aliases.delete(model, "live", "", "ci")


async def test_events_come_in_one_sequence_across_kinds(store: RegistryStore, unique: str) -> None:
    await _changes(store, unique)
    watch = store.events.watch([unique], 0, poll_seconds=30)
    try:
        events = await _take(watch, 4)
    finally:
        await watch.aclose()
    assert [type(e).__name__ for e in events] == [
        "AliasEvent",
        "ExperimentEvent",
        "AliasEvent",
        "AliasEvent",
    ]
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences))
    assert all(e.HasField("create_time") for e in events)


async def test_a_watch_resumes_after_a_sequence_and_skips_other_models(
    store: RegistryStore, unique: str
) -> None:
    await _changes(store, f"{unique}-other")
    await _changes(store, unique)
    watch = store.events.watch([unique], 0, poll_seconds=30)
    try:
        first, *rest = await _take(watch, 4)
    finally:
        await watch.aclose()
    assert {_model(e) for e in [first, *rest]} == {unique}
    resumed = store.events.watch([unique], first.sequence, poll_seconds=30)
    try:
        assert await _take(resumed, 3) == rest
    finally:
        await resumed.aclose()


async def test_a_watcher_wakes_at_a_write_without_polling(
    store: RegistryStore, unique: str
) -> None:
    await add_version(store, unique)
    watch = store.events.watch([unique], 0, poll_seconds=60)
    try:
        waiting = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)  # the watcher found nothing and waits
        assert not waiting.done()
        _, event = await store.aliases.set(unique, "live", 1, "", "ci", None)
        assert await asyncio.wait_for(waiting, 5) == event
    finally:
        await watch.aclose()

"""Aliases and their history in the domain store (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh_chassis.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from mlmesh_registry.store import RegistryStore
from registry_fixtures import add_version

Action = pb.AliasEvent.Action


async def _versions(store: RegistryStore, model: str, count: int) -> None:
    for i in range(count):
        await add_version(store, model, f"v{i}".encode())


async def _history(store: RegistryStore, model: str, alias: str = "") -> list[tuple[int, int]]:
    events, _ = await store.aliases.history(model, alias, 0, "")
    return [(e.from_version, e.to_version) for e in events]


async def test_an_alias_is_created_then_moved(store: RegistryStore, unique: str) -> None:
    await _versions(store, unique, 2)
    alias, created = await store.aliases.set(unique, "live", 1, "first", "ci", None)
    assert created is not None
    assert (alias.version, created.action, created.from_version, created.to_version) == (
        1,
        Action.ACTION_CREATED,
        0,
        1,
    )
    assert (created.actor, created.reason) == ("ci", "first")
    alias, moved = await store.aliases.set(unique, "live", 2, "better", "ci", None)
    assert moved is not None
    assert (moved.action, moved.from_version, moved.to_version) == (Action.ACTION_MOVED, 1, 2)
    assert moved.sequence > created.sequence
    assert (await store.aliases.get(unique, "live")).version == 2
    assert list((await store.versions.get(unique, 2)).aliases) == ["live"]


async def test_setting_an_alias_where_it_points_records_nothing(
    store: RegistryStore, unique: str
) -> None:
    await _versions(store, unique, 1)
    await store.aliases.set(unique, "live", 1, "", "ci", None)
    alias, event = await store.aliases.set(unique, "live", 1, "", "ci", None)
    assert (alias.version, event) == (1, None)
    assert await _history(store, unique) == [(0, 1)]


async def test_an_expected_version_makes_a_compare_and_set(
    store: RegistryStore, unique: str
) -> None:
    await _versions(store, unique, 3)
    await store.aliases.set(unique, "live", 1, "", "ci", expected_version=0)  # must not exist
    with pytest.raises(Aborted) as caught:
        await store.aliases.set(unique, "live", 3, "", "ci", expected_version=2)
    assert caught.value.metadata["current_version"] == "1"
    assert caught.value.metadata["expected_version"] == "2"
    await store.aliases.set(unique, "live", 3, "", "ci", expected_version=1)
    assert (await store.aliases.get(unique, "live")).version == 3


async def test_an_alias_points_only_at_a_version_that_exists(
    store: RegistryStore, unique: str
) -> None:
    await _versions(store, unique, 1)
    with pytest.raises(NotFound) as caught:
        await store.aliases.set(unique, "live", 2, "", "ci", None)
    assert caught.value.metadata == {"resource_type": "model version", "name": f"{unique}/2"}
    with pytest.raises(NotFound) as caught:
        await store.aliases.set(f"{unique}-none", "live", 1, "", "ci", None)
    assert caught.value.metadata["resource_type"] == "model"
    with pytest.raises(NotFound):
        await store.aliases.get(unique, "live")
    assert await _history(store, unique) == []


async def test_a_rollback_undoes_the_last_change(store: RegistryStore, unique: str) -> None:
    await _versions(store, unique, 3)
    for version in (1, 3):
        await store.aliases.set(unique, "live", version, "", "ci", None)
    alias, event = await store.aliases.rollback(unique, "live", "broken", "oncall")
    assert (alias.version, event.action) == (1, Action.ACTION_ROLLED_BACK)
    assert (event.from_version, event.to_version, event.actor) == (3, 1, "oncall")
    # the rollback is itself the last change: a second one undoes it
    alias, _ = await store.aliases.rollback(unique, "live", "", "oncall")
    assert alias.version == 3
    assert await _history(store, unique, "live") == [(0, 1), (1, 3), (3, 1), (1, 3)]


async def test_an_alias_with_no_previous_version_cannot_roll_back(
    store: RegistryStore, unique: str
) -> None:
    await _versions(store, unique, 1)
    with pytest.raises(NotFound) as caught:
        await store.aliases.rollback(unique, "live", "", "ci")
    assert caught.value.metadata == {"resource_type": "alias", "name": f"{unique}@live"}
    await store.aliases.set(unique, "live", 1, "", "ci", None)
    with pytest.raises(FailedPrecondition) as precondition:
        await store.aliases.rollback(unique, "live", "", "ci")
    assert precondition.value.metadata == {"model": unique, "alias": "live"}


async def test_a_deleted_alias_is_gone_and_recorded(store: RegistryStore, unique: str) -> None:
    await _versions(store, unique, 2)
    await store.aliases.set(unique, "live", 2, "", "ci", None)
    event = await store.aliases.delete(unique, "live", "retired", "ci")
    assert (event.action, event.from_version, event.to_version) == (Action.ACTION_DELETED, 2, 0)
    with pytest.raises(NotFound):
        await store.aliases.get(unique, "live")
    with pytest.raises(NotFound) as caught:
        await store.aliases.delete(unique, "live", "", "ci")
    assert caught.value.metadata["resource_type"] == "alias"
    with pytest.raises(NotFound) as caught:
        await store.aliases.delete(f"{unique}-none", "live", "", "ci")
    assert caught.value.metadata["resource_type"] == "model"
    assert list((await store.versions.get(unique, 2)).aliases) == []


async def test_aliases_and_their_history_list_in_pages(store: RegistryStore, unique: str) -> None:
    await _versions(store, unique, 2)
    for name in ("c", "a", "b"):
        await store.aliases.set(unique, name, 1, "", "ci", None)
    await store.aliases.set(unique, "a", 2, "", "ci", None)
    first, token = await store.aliases.list_page(unique, 2, "")
    rest, end = await store.aliases.list_page(unique, 2, token)
    assert [a.alias for a in first + rest] == ["a", "b", "c"]
    assert [a.version for a in first + rest] == [2, 1, 1]
    assert end == ""
    events, token = await store.aliases.history(unique, "", 3, "")
    more, _ = await store.aliases.history(unique, "", 3, token)
    assert [(e.alias, e.to_version) for e in events + more] == [
        ("c", 1),
        ("a", 1),
        ("b", 1),
        ("a", 2),
    ]
    sequences = [e.sequence for e in events + more]
    assert sequences == sorted(set(sequences))
    assert await _history(store, unique, "a") == [(0, 1), (1, 2)]
    with pytest.raises(InvalidArgument):  # a token of another alias' history
        await store.aliases.history(unique, "a", 3, token)

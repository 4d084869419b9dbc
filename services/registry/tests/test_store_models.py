"""Models and versions in the domain store (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh_chassis.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from mlmesh_registry.store import RegistryStore
from registry_fixtures import add_version

# ---- models -----------------------------------------------------------------


async def test_a_created_model_reads_back_with_its_tags(store: RegistryStore, unique: str) -> None:
    created = await store.models.create(
        pb.Model(name=unique, description="a classifier", tags={"team": "vision"})
    )
    assert (created.name, created.description, created.latest_version) == (
        unique,
        "a classifier",
        0,
    )
    assert dict(created.tags) == {"team": "vision"}
    assert created.create_time == created.update_time
    assert await store.models.get(unique) == created
    assert await store.models.exists(unique)


async def test_a_model_name_is_taken_once(store: RegistryStore, unique: str) -> None:
    await store.models.create(pb.Model(name=unique))
    with pytest.raises(AlreadyExists) as caught:
        await store.models.create(pb.Model(name=unique, description="again"))
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert caught.value.metadata == {"resource_type": "model", "name": unique}
    assert (await store.models.get(unique)).description == ""


async def test_a_missing_model_is_not_found(store: RegistryStore, unique: str) -> None:
    with pytest.raises(NotFound) as caught:
        await store.models.get(unique)
    assert caught.value.metadata == {"resource_type": "model", "name": unique}


async def test_models_list_by_prefix_and_tags_in_pages(store: RegistryStore, unique: str) -> None:
    for i in range(5):
        tags = {"stage": "prod" if i % 2 else "dev"}
        await store.models.create(pb.Model(name=f"{unique}-{i}", tags=tags))
    names: list[str] = []
    token = ""
    while True:
        page, token = await store.models.list_page(2, token, unique, {})
        assert len(page) <= 2
        names += [m.name for m in page]
        if not token:
            break
    assert names == [f"{unique}-{i}" for i in range(5)]
    prod, token = await store.models.list_page(0, "", unique, {"stage": "prod"})
    assert ([m.name for m in prod], token) == ([f"{unique}-1", f"{unique}-3"], "")
    # a prefix is a prefix, not a LIKE pattern
    assert (await store.models.list_page(0, "", unique[:-1] + "_", {}))[0] == []


async def test_a_page_token_belongs_to_its_own_filters(store: RegistryStore, unique: str) -> None:
    for i in range(3):
        await store.models.create(pb.Model(name=f"{unique}-{i}"))
    _, token = await store.models.list_page(1, "", unique, {})
    assert token
    for bad_token, prefix in ((token, f"{unique}-1"), ("not-a-token", unique)):
        with pytest.raises(InvalidArgument) as caught:
            await store.models.list_page(1, bad_token, prefix, {})
        assert [v.field for v in caught.value.violations] == ["page_token"]


async def test_an_update_changes_only_the_masked_fields(store: RegistryStore, unique: str) -> None:
    await store.models.create(pb.Model(name=unique, description="old", tags={"a": "1"}))
    changed = pb.Model(name=unique, description="new", tags={"b": "2"})
    updated = await store.models.update(changed, ["tags"])
    assert (updated.description, dict(updated.tags)) == ("old", {"b": "2"})
    updated = await store.models.update(changed, ["description"])
    assert (updated.description, dict(updated.tags)) == ("new", {"b": "2"})
    for paths in ([], ["name"], ["description", "latest_version"]):
        with pytest.raises(InvalidArgument) as caught:
            await store.models.update(changed, paths)
        assert [v.field for v in caught.value.violations] == ["update_mask"]
    with pytest.raises(NotFound):
        await store.models.update(pb.Model(name=f"{unique}-none"), ["description"])


# ---- versions ---------------------------------------------------------------


async def test_versions_number_themselves_from_one(store: RegistryStore, unique: str) -> None:
    numbers = [(await add_version(store, unique, bytes([i]))).version for i in range(3)]
    assert numbers == [1, 2, 3]
    assert (await store.models.get(unique)).latest_version == 3


async def test_concurrent_versions_get_distinct_numbers(store: RegistryStore, unique: str) -> None:
    await store.models.create(pb.Model(name=unique))
    added = await asyncio.gather(
        *(add_version(store, unique, bytes([i]), create_model=False) for i in range(6))
    )
    assert sorted(v.version for v in added) == [1, 2, 3, 4, 5, 6]


async def test_a_version_of_a_missing_model_needs_create_model(
    store: RegistryStore, unique: str
) -> None:
    with pytest.raises(NotFound) as caught:
        await add_version(store, unique, create_model=False)
    assert caught.value.metadata["resource_type"] == "model"
    assert not await store.models.exists(unique)
    version = await add_version(store, unique, description="first", tags={"run": "7"})
    assert (version.version, version.description, dict(version.tags)) == (1, "first", {"run": "7"})
    assert (await store.models.get(unique)).latest_version == 1


async def test_a_version_reads_back_whole(store: RegistryStore, unique: str) -> None:
    lineage = pb.Lineage(environment_lock="torch==2.5")
    added = await add_version(store, unique, b"bytes", format="triton", lineage=lineage)
    got = await store.versions.get(unique, 1)
    assert got == added
    assert (got.format, got.size_bytes, got.lineage.environment_lock) == ("triton", 5, "torch==2.5")
    assert await store.versions.artifact_path(unique, 1) == f"artifacts/{unique}/{got.sha256}.bin"


async def test_a_missing_version_says_what_is_missing(store: RegistryStore, unique: str) -> None:
    await add_version(store, unique)
    with pytest.raises(NotFound) as caught:
        await store.versions.get(unique, 2)
    assert caught.value.metadata == {"resource_type": "model version", "name": f"{unique}/2"}
    with pytest.raises(NotFound) as caught:
        await store.versions.get(f"{unique}-none", 1)
    assert caught.value.metadata["resource_type"] == "model"
    with pytest.raises(NotFound):
        await store.versions.artifact_path(unique, 2)


async def test_a_reference_resolves_by_number_alias_or_newest(
    store: RegistryStore, unique: str
) -> None:
    for data in (b"one", b"two", b"three"):
        await add_version(store, unique, data)
    await store.aliases.set(unique, "champion", 2, "", "tester", None)
    resolved = [
        await store.versions.resolve(ModelReference(model=unique, version=1)),
        await store.versions.resolve(ModelReference(model=unique, alias="champion")),
        await store.versions.resolve(ModelReference(model=unique)),
    ]
    assert [v.version for v in resolved] == [1, 2, 3]
    assert list(resolved[1].aliases) == ["champion"]


async def test_a_reference_to_nothing_gets_the_right_status(
    store: RegistryStore, unique: str
) -> None:
    await store.models.create(pb.Model(name=unique))
    with pytest.raises(FailedPrecondition):  # no versions yet
        await store.versions.resolve(ModelReference(model=unique))
    with pytest.raises(NotFound) as caught:
        await store.versions.resolve(ModelReference(model=unique, alias="champion"))
    assert caught.value.metadata == {"resource_type": "alias", "name": f"{unique}@champion"}
    with pytest.raises(NotFound) as caught:
        await store.versions.resolve(ModelReference(model=f"{unique}-none", alias="champion"))
    assert caught.value.metadata["resource_type"] == "model"


async def test_versions_list_newest_first_and_by_tag(store: RegistryStore, unique: str) -> None:
    for i in range(5):
        await add_version(store, unique, bytes([i]), tags={"even": str(i % 2 == 0).lower()})
    numbers: list[int] = []
    token = ""
    while True:
        page, token = await store.versions.list_page(unique, 2, token, {})
        numbers += [v.version for v in page]
        if not token:
            break
    assert numbers == [5, 4, 3, 2, 1]
    even, _ = await store.versions.list_page(unique, 0, "", {"even": "true"})
    assert [v.version for v in even] == [5, 3, 1]
    with pytest.raises(NotFound):
        await store.versions.list_page(f"{unique}-none", 0, "", {})


async def test_a_version_update_changes_description_and_tags_only(
    store: RegistryStore, unique: str
) -> None:
    added = await add_version(store, unique, description="old", tags={"a": "1"})
    changed = pb.ModelVersion(
        model=unique, version=1, description="new", tags={"b": "2"}, sha256="0" * 64
    )
    updated = await store.versions.update(changed, ["description", "tags"])
    assert (updated.description, dict(updated.tags)) == ("new", {"b": "2"})
    assert updated.sha256 == added.sha256
    with pytest.raises(InvalidArgument):
        await store.versions.update(changed, ["sha256"])
    with pytest.raises(NotFound):
        await store.versions.update(
            pb.ModelVersion(model=unique, version=9, description="x"), ["description"]
        )

"""The upload session: a header, chunks, then one whole version or nothing
(no row, no file, no folder), however the upload ends."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh_chassis.errors import Aborted, DataLoss, InvalidArgument, NotFound, Reason
from mlmesh_registry.artifacts import ArtifactStore
from mlmesh_registry.store import RegistryStore
from mlmesh_registry.uploads import UploadLimits, UploadSession
from registry_fixtures import upload_header

LIMITS = UploadLimits(max_artifact_bytes=1024, max_chunk_bytes=16, idle_timeout_s=0.3)
DATA = b"0123456789abcdefghijklmnopqrstuvwxyz"  # three chunks of at most 16 bytes


def _session(store: RegistryStore, artifacts: ArtifactStore) -> UploadSession:
    return UploadSession(store, artifacts, LIMITS)


def _chunks(data: bytes = DATA, size: int = 16) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def _upload(
    store: RegistryStore, artifacts: ArtifactStore, header: rpc.UploadHeader, chunks: list[bytes]
) -> pb.ModelVersion:
    async with _session(store, artifacts) as upload:
        await upload.begin(header)
        for chunk in chunks:
            await upload.write(chunk)
        return await upload.commit()


def _files(artifacts: ArtifactStore) -> list[str]:
    """Every file and folder under the artifact root but the (empty) uploads folder."""
    root = Path(artifacts.root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.name != ".uploads")


async def _nothing_left(store: RegistryStore, artifacts: ArtifactStore, model: str) -> None:
    assert _files(artifacts) == []
    assert not await store.models.exists(model)


async def test_an_upload_becomes_the_next_version(
    store: RegistryStore, artifacts: ArtifactStore, unique: str
) -> None:
    header = upload_header(unique, DATA, description="first", tags={"run": "1"}, format="triton")
    version = await _upload(store, artifacts, header, _chunks())
    assert (version.model, version.version, version.size_bytes) == (unique, 1, len(DATA))
    assert (version.description, dict(version.tags), version.format) == (
        "first",
        {"run": "1"},
        "triton",
    )
    [path] = _files(artifacts)[1:]  # the model's folder, then its one file
    assert path.startswith(f"{unique}/") and path.endswith(".bin")
    assert (Path(artifacts.root) / path).read_bytes() == DATA
    assert await store.versions.artifact_path(unique, 1) == f"{artifacts.root}/{path}"
    again = await _upload(store, artifacts, upload_header(unique, b"v2"), [b"v2"])
    assert again.version == 2


class _ModelQueries:
    """Counts the statements that read the models table."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = " ".join(statement.lower().split())
        if text.startswith("select") and "from models" in text:
            self.count += 1


@pytest.fixture
def model_queries() -> Iterator[_ModelQueries]:
    counter = _ModelQueries()
    sa.event.listen(sa.Engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", counter)


@pytest.mark.parametrize(("create_model", "reads"), [(False, 1), (True, 0)])
async def test_the_model_is_looked_up_once_at_most(
    store: RegistryStore,
    artifacts: ArtifactStore,
    unique: str,
    model_queries: _ModelQueries,
    create_model: bool,
    reads: int,
) -> None:
    await store.models.create(pb.Model(name=unique))
    model_queries.count = 0
    header = upload_header(unique, DATA, create_model=create_model)
    assert (await _upload(store, artifacts, header, _chunks())).version == 1
    # create_model: the version number's increment finds the model, no read
    assert model_queries.count == reads


async def test_a_missing_model_is_refused_before_any_byte(
    store: RegistryStore, artifacts: ArtifactStore, unique: str
) -> None:
    async with _session(store, artifacts) as upload:
        with pytest.raises(NotFound) as caught:
            await upload.begin(upload_header(unique, DATA, create_model=False))
        assert upload.received == 0
    assert caught.value.metadata == {"resource_type": "model", "name": unique}
    await _nothing_left(store, artifacts, unique)
    assert not list(Path(artifacts.root).rglob("*.partial"))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"size_bytes": LIMITS.max_artifact_bytes + 1}, "header.size_bytes"),
        (
            {"lineage": pb.Lineage(environment_lock="x" * (1024 * 1024 + 1))},
            "header.lineage",
        ),
    ],
)
async def test_an_invalid_header_is_refused_naming_its_field(
    store: RegistryStore,
    artifacts: ArtifactStore,
    unique: str,
    fields: dict[str, Any],
    field: str,
) -> None:
    async with _session(store, artifacts) as upload:
        with pytest.raises(InvalidArgument) as caught:
            await upload.begin(upload_header(unique, DATA, **fields))
    assert [v.field for v in caught.value.violations] == [field]
    await _nothing_left(store, artifacts, unique)


@pytest.mark.parametrize(
    ("chunks", "field"),
    [
        ([DATA[:17]], "chunk"),  # over the chunk limit
        ([*_chunks(), b"!"], "header.size_bytes"),  # more than declared
    ],
)
async def test_a_bad_chunk_ends_the_upload_and_removes_its_bytes(
    store: RegistryStore, artifacts: ArtifactStore, unique: str, chunks: list[bytes], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await _upload(store, artifacts, upload_header(unique, DATA), chunks)
    assert caught.value.metadata["field"] == field
    await _nothing_left(store, artifacts, unique)


async def test_a_short_upload_is_incomplete(
    store: RegistryStore, artifacts: ArtifactStore, unique: str
) -> None:
    with pytest.raises(Aborted) as caught:
        await _upload(store, artifacts, upload_header(unique, DATA), _chunks()[:2])
    assert caught.value.reason == Reason.ERROR_REASON_UPLOAD_INCOMPLETE
    assert caught.value.metadata == {"received_bytes": "32", "size_bytes": str(len(DATA))}
    await _nothing_left(store, artifacts, unique)


async def test_a_checksum_mismatch_is_data_loss(
    store: RegistryStore, artifacts: ArtifactStore, unique: str
) -> None:
    header = upload_header(unique, DATA, sha256=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(DataLoss) as caught:
        await _upload(store, artifacts, header, _chunks())
    assert caught.value.metadata["actual_sha256"] == hashlib.sha256(DATA).hexdigest()
    await _nothing_left(store, artifacts, unique)


async def test_a_second_header_is_refused(
    store: RegistryStore, artifacts: ArtifactStore, unique: str
) -> None:
    async with _session(store, artifacts) as upload:
        await upload.begin(upload_header(unique, DATA))
        with pytest.raises(InvalidArgument):
            await upload.begin(upload_header(unique, DATA))
    await _nothing_left(store, artifacts, unique)


async def test_a_cancelled_upload_leaves_nothing(
    store: RegistryStore, artifacts: ArtifactStore, unique: str
) -> None:
    written = asyncio.Event()

    async def stalls() -> None:
        async with _session(store, artifacts) as upload:
            await upload.begin(upload_header(unique, DATA))
            await upload.write(DATA[:16])
            written.set()
            await asyncio.sleep(60)  # the client neither sends nor ends the stream

    task = asyncio.create_task(stalls())
    await asyncio.wait_for(written.wait(), 5)
    assert list(Path(artifacts.root).rglob("*.partial"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _nothing_left(store, artifacts, unique)


async def test_an_idle_stream_is_aborted_with_what_it_sent(
    store: RegistryStore, artifacts: ArtifactStore, unique: str
) -> None:
    async def stalls() -> AsyncIterator[bytes]:
        yield DATA[:16]
        await asyncio.sleep(60)
        yield DATA[16:]

    async with _session(store, artifacts) as upload:
        await upload.begin(upload_header(unique, DATA))
        with pytest.raises(Aborted) as caught:
            async for chunk in upload.messages(stalls()):
                await upload.write(chunk)
    assert caught.value.reason == Reason.ERROR_REASON_UPLOAD_INCOMPLETE
    assert caught.value.metadata["received_bytes"] == "16"
    await _nothing_left(store, artifacts, unique)


async def test_a_failed_record_removes_the_moved_file(
    store: RegistryStore, artifacts: ArtifactStore, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fails(header: rpc.UploadHeader, path: str) -> pb.ModelVersion:
        assert Path(path).read_bytes() == DATA  # sealed and moved into place
        raise RuntimeError("the database went away")

    monkeypatch.setattr(store.versions, "add", fails)
    with pytest.raises(RuntimeError):
        await _upload(store, artifacts, upload_header(unique, DATA), _chunks())
    await _nothing_left(store, artifacts, unique)


@pytest.mark.parametrize("recorded", [True, False])
async def test_a_caller_cancelled_during_commit_leaves_a_whole_version_or_nothing(
    store: RegistryStore,
    artifacts: ArtifactStore,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    recorded: bool,
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    add = store.versions.add

    async def slow(header: rpc.UploadHeader, path: str) -> pb.ModelVersion:
        entered.set()
        await release.wait()
        if not recorded:
            raise RuntimeError("the database went away")
        return await add(header, path)

    monkeypatch.setattr(store.versions, "add", slow)
    task = asyncio.create_task(_upload(store, artifacts, upload_header(unique, DATA), _chunks()))
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _files(artifacts)  # the commit, not the caller, decides what stays
    release.set()
    for _ in range(100):  # the commit finishes on its own
        await asyncio.sleep(0.02)
        if recorded == await store.models.exists(unique) and (recorded or not _files(artifacts)):
            break
    if recorded:
        path = await store.versions.artifact_path(unique, 1)
        assert Path(path).read_bytes() == DATA
    else:
        await _nothing_left(store, artifacts, unique)

"""An upload: a header, then chunks, then one new version or nothing.

An UploadSession takes the header (checked for what the contract's rules
cannot say, and the model's existence asked once, before any byte is taken),
is fed the chunks, which go to a private partial file (see ``artifacts``)
while they are hashed, and on commit verifies the size and the sha256, moves
the file into place and records the version in one transaction. Leaving the
session any other way (an error, a stream cut off or idle too long,
cancellation) deletes what was written: no row, no file, no empty folder.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh_chassis.errors import Aborted, DataLoss, InvalidArgument, NotFound, Reason

from mlmesh_registry.artifacts import ArtifactStore, ArtifactWriter
from mlmesh_registry.config import RegistrySettings
from mlmesh_registry.store import RegistryStore, VersionStore
from mlmesh_registry.validation import MAX_LINEAGE_BYTES

log = logging.getLogger("mlmesh.registry")
T = TypeVar("T")
# Commits whose caller went away: they finish (or clean up) by themselves.
_finishing: set[asyncio.Task[pb.ModelVersion]] = set()


@dataclass(frozen=True)
class UploadLimits:
    max_artifact_bytes: int
    max_chunk_bytes: int
    # A stream that sends nothing for this long is ended (ABORTED).
    idle_timeout_s: float

    @classmethod
    def of(cls, settings: RegistrySettings) -> UploadLimits:
        return cls(
            settings.max_artifact_bytes,
            settings.max_chunk_bytes,
            settings.upload_idle_timeout_seconds,
        )


class UploadSession:
    """``async with UploadSession(...) as upload``: ``begin(header)``,
    ``write(chunk)`` for each chunk, ``commit()``. Leaving the block without a
    commit discards the upload."""

    def __init__(
        self, store: RegistryStore, artifacts: ArtifactStore, limits: UploadLimits
    ) -> None:
        self._store = store
        self._artifacts = artifacts
        self._limits = limits
        self._header: rpc.UploadHeader | None = None
        self._writer: ArtifactWriter | None = None
        self._commit: asyncio.Task[pb.ModelVersion] | None = None

    @property
    def received(self) -> int:
        """Bytes taken so far."""
        return self._writer.size if self._writer is not None else 0

    async def __aenter__(self) -> UploadSession:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Once commit started, its task owns the file (kept or removed);
        # before, nothing may stay. Shielded: a cancelled call's cleanup must
        # finish even if the handler's task is cancelled again while it runs.
        if self._commit is None and self._writer is not None:
            await asyncio.shield(self._writer.discard())

    async def messages(self, stream: AsyncIterable[T]) -> AsyncIterator[T]:
        """The stream's messages; ABORTED (UPLOAD_INCOMPLETE) once none came
        for the idle timeout (a stalled upload must not hold its partial file
        and a task forever)."""
        idle_s = self._limits.idle_timeout_s
        iterator = aiter(stream)
        while True:
            try:
                message = await asyncio.wait_for(anext(iterator), idle_s)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise Aborted(
                    f"no upload message for {idle_s:g} s after {self.received} bytes; "
                    "the upload was abandoned",
                    reason=Reason.ERROR_REASON_UPLOAD_INCOMPLETE,
                    idle_timeout_s=f"{idle_s:g}",
                    received_bytes=self.received,
                ) from None
            yield message

    async def begin(self, header: rpc.UploadHeader) -> None:
        """Checks the header and opens the partial file."""
        if self._header is not None:
            raise InvalidArgument.field("header", "only the first message may be a header")
        self._check(header)
        if not header.create_model and not await self._store.models.exists(header.model):
            raise NotFound("model", header.model)
        self._writer = await self._artifacts.begin(header.model)
        self._header = header

    async def write(self, chunk: bytes) -> None:
        header, writer = self._started()
        if len(chunk) > self._limits.max_chunk_bytes:
            raise InvalidArgument.field(
                "chunk", f"at most {self._limits.max_chunk_bytes} bytes per chunk"
            )
        if writer.size + len(chunk) > header.size_bytes:
            raise InvalidArgument(
                f"more bytes than the declared size_bytes {header.size_bytes}",
                field="header.size_bytes",
                size_bytes=header.size_bytes,
            )
        await writer.write(chunk)

    async def commit(self) -> pb.ModelVersion:
        """Verifies what came and records it as the model's next version."""
        header, writer = self._started()
        if writer.size < header.size_bytes:
            raise Aborted(
                f"upload ended after {writer.size} of {header.size_bytes} bytes",
                reason=Reason.ERROR_REASON_UPLOAD_INCOMPLETE,
                received_bytes=writer.size,
                size_bytes=header.size_bytes,
            )
        if writer.sha256 != header.sha256:
            raise DataLoss(
                f"sha256 {writer.sha256} does not match the declared {header.sha256}",
                actual_sha256=writer.sha256,
                sha256=header.sha256,
            )
        # A task of its own, shielded: a caller cancelled while the version is
        # recorded must not leave a row whose file was deleted, or a file no
        # row names. The task keeps both or removes the file.
        self._commit = task = asyncio.create_task(
            _seal_and_record(self._store.versions, header, writer)
        )
        _finishing.add(task)
        task.add_done_callback(_finishing.discard)
        return await asyncio.shield(task)

    def _started(self) -> tuple[rpc.UploadHeader, ArtifactWriter]:
        if self._header is None or self._writer is None:
            raise InvalidArgument.field("header", "the first message must carry the header")
        if self._commit is not None:
            raise RuntimeError("the upload was committed already")
        return self._header, self._writer

    def _check(self, header: rpc.UploadHeader) -> None:
        """What the contract's rules (checked by the chassis: the model's
        name, the sha256's form, a positive size, the text and tags) cannot
        say: this registry's size limit and the lineage's serialized size."""
        if header.size_bytes > self._limits.max_artifact_bytes:
            raise InvalidArgument.field(
                "header.size_bytes", f"at most {self._limits.max_artifact_bytes} bytes"
            )
        if header.lineage.ByteSize() > MAX_LINEAGE_BYTES:
            raise InvalidArgument.field(
                "header.lineage", f"at most {MAX_LINEAGE_BYTES} bytes serialized"
            )


async def _seal_and_record(
    versions: VersionStore, header: rpc.UploadHeader, writer: ArtifactWriter
) -> pb.ModelVersion:
    try:
        version = await versions.add(header, await writer.seal())
    except BaseException:
        await asyncio.shield(writer.discard())
        raise
    log.info(
        "version uploaded",
        extra={"model": header.model, "version": version.version, "size_bytes": version.size_bytes},
    )
    return version

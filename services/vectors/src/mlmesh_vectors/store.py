"""The servicer's view of the engine: every engine call on a worker thread
(never on the event loop), writes numbered, and the instance's role.

- ``primary`` (the embedded engine's first instance): owns the data; each
  write is applied, numbered and logged for read replicas (replication.py).
- ``replica`` (the embedded engine's other instances): follows the
  primary's change log on a thread of its own; refuses writes (Envoy never
  routes them here).
- ``cluster`` (a Qdrant server or cluster): every instance reads and writes
  the cluster; writes are not numbered (write_sequence 0).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from mlmesh_chassis.context import remaining_time
from mlmesh_chassis.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MlmeshError,
    NotFound,
    Unavailable,
)

from mlmesh_vectors.config import VectorsSettings
from mlmesh_vectors.engine.base import (
    BackendError,
    Batch,
    CollectionExists,
    CollectionNotFound,
    CollectionSpec,
    CollectionState,
    EngineUnavailable,
    Filter,
    PointNotFound,
    SnapshotNotFound,
    Unsupported,
    VectorBackend,
    spec_to_json,
)
from mlmesh_vectors.replication import Change, ChangeLog, Follower

log = logging.getLogger("mlmesh.vectors.store")
T = TypeVar("T")
Role = Literal["primary", "replica", "cluster"]
# The longest a read waits for its min_write_sequence.
MAX_CONSISTENCY_WAIT_S = 2.0
# How long before the caller's deadline such a wait gives up.
_DEADLINE_MARGIN_S = 0.25
# Page size when a delete by filter resolves the matching ids.
_SCROLL_PAGE = 1000


def engine_error(error: Exception) -> MlmeshError:
    """The gRPC-mapped error for an engine's exception (others are re-raised)."""
    if isinstance(error, CollectionNotFound):
        return NotFound("collection", error.name, f"collection {error.name} not found")
    if isinstance(error, CollectionExists):
        return AlreadyExists("collection", error.name)
    if isinstance(error, SnapshotNotFound):
        return NotFound(
            "snapshot",
            error.name,
            f"snapshot {error.name} of collection {error.collection} not found",
        )
    if isinstance(error, PointNotFound):
        return NotFound("point", error.point_id, f"point {error.point_id} not found")
    if isinstance(error, Unsupported):
        return FailedPrecondition(f"the vector engine cannot do this: {error}")
    if isinstance(error, EngineUnavailable):
        return Unavailable(f"the vector engine failed; nothing was written: {error}", 1.0)
    raise error


class VectorStore:
    def __init__(
        self,
        backend: VectorBackend,
        role: Role,
        *,
        threads: int = 2,
        changelog: ChangeLog | None = None,
        follower: Follower | None = None,
    ) -> None:
        self.backend = backend
        self.role = role
        self.changelog = changelog
        self.follower = follower
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="engine")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def open(cls, settings: VectorsSettings) -> VectorStore:
        """The store for this instance's settings (file and engine work: call
        it off the event loop)."""
        if settings.backend == "qdrant":
            from mlmesh_vectors.engine.remote import RemoteBackend

            key = settings.qdrant_api_key_file
            local = settings.qdrant_local_path
            return cls(
                RemoteBackend(
                    settings.qdrant_url,
                    path=str(local) if local is not None else None,
                    api_key=key.read_text().strip() if key else None,
                    default_ef=settings.default_hnsw_ef,
                ),
                "cluster",
                threads=settings.engine_threads,
            )
        from mlmesh_vectors.engine.edge import EdgeBackend

        root = settings.root
        if settings.is_primary:
            primary = EdgeBackend(root / "primary", default_ef=settings.default_hnsw_ef)
            changelog = ChangeLog(root / "replication", primary)
            changelog.start()
            return cls(primary, "primary", threads=settings.engine_threads, changelog=changelog)
        # A replica starts from the primary's bases each time: its own copy
        # is rebuilt, never trusted across restarts.
        own = root / "replicas" / settings.instance
        shutil.rmtree(own, ignore_errors=True)
        replica = EdgeBackend(own, default_ef=settings.default_hnsw_ef, auto_index=False)
        return cls(
            replica,
            "replica",
            threads=settings.engine_threads,
            follower=Follower(root / "replication", replica),
        )

    def start(self, follow_interval_s: float) -> None:
        """Starts the replica's follower or the primary's maintenance thread."""
        if self.follower is not None:
            follower = self.follower
            target: Callable[[], None] = lambda: follower.run_forever(  # noqa: E731
                follow_interval_s, self._stop
            )
        elif self.changelog is not None:
            changelog = self.changelog

            def target() -> None:
                while not self._stop.wait(1.0):
                    try:
                        changelog.maintain()
                    except Exception:
                        log.exception("change log maintenance failed")
        else:
            return
        thread = threading.Thread(target=target, name=f"{self.role}-replication", daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._executor.shutdown(wait=True)
        self.backend.close()

    @property
    def applied(self) -> int:
        if self.follower is not None:
            return self.follower.applied
        if self.changelog is not None:
            return self.changelog.last_seq
        return 0

    # ---- reads ------------------------------------------------------------

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` on an engine thread; engine errors mapped."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, call, *args)
        except BackendError as error:
            raise engine_error(error) from error

    async def caught_up(self, min_write_sequence: int) -> None:
        """Returns once this instance has applied write ``min_write_sequence``
        (at once for 0): call it before anything else a read does."""
        if min_write_sequence > self.applied:
            await self._wait_applied(min_write_sequence)

    async def _wait_applied(self, seq: int) -> None:
        if self.follower is None:
            raise InvalidArgument.field(
                "min_write_sequence",
                f"no write {seq} was made (the newest is {self.applied})",
            )
        left = remaining_time()
        if left is None:
            timeout = MAX_CONSISTENCY_WAIT_S
        else:
            # Give up a little before the caller's deadline, so the answer
            # (UNAVAILABLE with the write reached) arrives while it still listens.
            timeout = min(left - min(left / 4, _DEADLINE_MARGIN_S), MAX_CONSISTENCY_WAIT_S)
        follower = self.follower
        if not await asyncio.to_thread(follower.wait_applied, seq, timeout):
            raise Unavailable(
                f"this replica has applied writes up to {follower.applied}, not yet {seq}",
                retry_after_s=0.1,
                applied=follower.applied,
            )

    async def spec(self, name: str) -> CollectionSpec:
        """The collection's spec: the embedded engine keeps it in memory (no
        thread hop, it is on every request's path); a cluster is asked."""
        if self.role == "cluster":
            return await self.run(self.backend.spec, name)
        try:
            return self.backend.spec(name)
        except BackendError as error:
            raise engine_error(error) from error

    # ---- writes -----------------------------------------------------------

    def check_writable(self) -> None:
        if self.role == "replica":
            raise FailedPrecondition(
                "this instance is a read replica: writes go to the primary "
                "(Envoy routes them there)"
            )

    async def write(self, collection: str, apply: Callable[[], Change]) -> tuple[int, Change]:
        """Runs ``apply`` (an engine write returning its change record) on an
        engine thread; on the primary, numbered and logged in one step."""
        self.check_writable()
        changelog = self.changelog
        if changelog is None:
            change = await self.run(apply)
            return 0, change
        return await self.run(changelog.write, collection, apply)

    async def create_collection(self, spec: CollectionSpec) -> tuple[int, CollectionSpec]:
        created: list[CollectionSpec] = []

        def apply() -> Change:
            created.append(self.backend.create_collection(spec))
            return Change(0, "create", spec.name, spec=spec_to_json(created[0]))

        seq, _ = await self.write(spec.name, apply)
        return seq, created[0]

    async def delete_collection(self, name: str) -> tuple[int, bool]:
        deleted: list[bool] = []

        def apply() -> Change:
            deleted.append(self.backend.delete_collection(name))
            return Change(0, "delete_collection", name)

        seq, _ = await self.write(name, apply)
        return seq, deleted[0]

    async def upsert(self, collection: str, batch: Batch) -> tuple[int, int]:
        def apply() -> Change:
            self.backend.upsert(collection, batch)
            return Change(
                0,
                "upsert",
                collection,
                ids=batch.ids,
                payloads=batch.payloads,
                vectors=batch.vectors,
            )

        seq, _ = await self.write(collection, apply)
        return seq, len(batch.ids)

    async def delete_ids(self, collection: str, ids: Sequence[str]) -> tuple[int, int]:
        deleted: list[int] = []

        def apply() -> Change:
            deleted.append(self.backend.delete_ids(collection, ids))
            return Change(0, "delete_ids", collection, ids=list(ids))

        seq, _ = await self.write(collection, apply)
        return seq, deleted[0]

    async def delete_by_filter(self, collection: str, filter: Filter) -> tuple[int, int]:
        """Resolved to the matching ids under the write lock, so replicas
        delete exactly the same points."""
        deleted: list[int] = []

        def apply() -> Change:
            ids: list[str] = []
            offset: str | None = None
            while True:
                records, offset = self.backend.scroll(
                    collection, offset, _SCROLL_PAGE, filter, False, False
                )
                ids.extend(r.id for r in records)
                if offset is None:
                    break
            deleted.append(self.backend.delete_ids(collection, ids) if ids else 0)
            return Change(0, "delete_ids", collection, ids=ids)

        seq, _ = await self.write(collection, apply)
        return seq, deleted[0]

    async def restore_snapshot(self, collection: str, snapshot: str) -> tuple[int, CollectionState]:
        restored: list[CollectionState] = []

        def apply() -> Change:
            restored.append(self.backend.restore_snapshot(collection, snapshot))
            path = getattr(self.backend, "snapshot_path", None)
            return Change(
                0,
                "install",
                collection,
                path=str(path(collection, snapshot)) if path is not None else None,
            )

        seq, _ = await self.write(collection, apply)
        return seq, restored[0]

    async def create_snapshot(self, collection: str) -> Any:
        self.check_writable()
        if self.changelog is not None:
            changelog = self.changelog

            def locked() -> Any:
                with changelog.lock:
                    return self.backend.create_snapshot(collection)

            return await self.run(locked)
        return await self.run(self.backend.create_snapshot, collection)

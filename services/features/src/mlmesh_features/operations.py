"""Long-running operations (AIP-151): Materialize and GetHistoricalFeatures.

**The log.** Every operation is a row of ``operations.db`` (SQLite, in the
feature root, WAL with ``synchronous=FULL``: a commit survives a killed
process and a power cut, and a half-done transaction is rolled back on the
next open). A row holds the operation's id, kind, request (JSON), chunk
plan, state, chunks total and done, rows written, times, resumed count, and
the error (code, reason, message) or the result. The log is also the queue:
the runner takes the oldest operation that is PENDING or RUNNING.

**The runner** executes one operation at a time as an asyncio task that
never computes on the event loop: the batch computation runs on a worker
thread (``asyncio.to_thread``), online writes on the store's Feast thread,
log updates on a worker thread. At most ``max_pending`` operations may wait;
one more is RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo.

**Materialize** is chunked by time, the chunk bounds being chosen so that
each chunk holds about ``chunk_events`` of the source's events (a view's
rows per chunk are bounded by its events per chunk, whatever the range's
length: feast#6307 is Feast's materialize holding the whole range), and a
windowed view's chunks span at least its longest window (so the events a
chunk reads before its start are at most about as many as its own). The
source's events are read once per operation; each chunk's rows are computed
from the events it needs (for a windowed view, those within the longest
window before the chunk), written (the latest per entity in the chunk; the
chunks go in time order, so each writes values newer than the last), and
the chunk is committed to the log (done_chunks, rows_written) before the
next starts. An operation is done only after its last chunk: no partial
state is reported as complete. Started again after a crash, the service
resumes every operation that was PENDING or RUNNING after its last
committed chunk (resumed_count + 1); the chunk that was cut off is computed
and written again (the same values: writes are idempotent). The plan (chunk
bounds and the resolved end) is fixed when the operation starts, so a
resumed operation covers the same range. A store that cannot be reached is
retried (``store_retries`` times, doubling waits from ``retry_base_s``),
then the operation FAILS with UNAVAILABLE. Cancel stops it after the
current chunk: CANCELLED, with a CANCELLED error; chunks written stay.

**GetHistoricalFeatures** computes each feature view's rows (one chunk per
view, from the events up to the latest entity row's time) and then joins
them point-in-time (``batch.point_in_time_join``, one last chunk) into a
parquet file the server names, ``<root>/historical/<id>.parquet``, written
under a temporary name and renamed. Its intermediate rows are not kept: a
resumed one starts over.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlmesh.common.v1 import errors_pb2
from mlmesh_chassis.errors import (
    InvalidArgument,
    MlmeshError,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
)
from mlmesh_chassis.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

from mlmesh_features.batch import EVENT_TIMESTAMP, compute_view, point_in_time_join
from mlmesh_features.definitions import Definitions, FeatureView

if TYPE_CHECKING:
    from mlmesh_features.store import FeastThread, FeatureStore

log = logging.getLogger(__name__)

MATERIALIZE = "materialize"
HISTORICAL_FEATURES = "historical_features"

PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
DONE_STATES = (SUCCEEDED, FAILED, CANCELLED)

# The times pandas can hold (ns since the epoch in an int64): from the epoch
# on, for the inputs a caller sends.
MAX_TIME_NS = 2**63 - 1


@dataclass(frozen=True)
class OperationError:
    """Why an operation failed or was cancelled: a gRPC status code's name
    (``UNAVAILABLE``), an ErrorReason number, a message and its variables."""

    code: str
    reason: int
    message: str
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, error: MlmeshError) -> OperationError:
        return cls(error.code.name, error.reason, error.message, dict(error.metadata))


@dataclass(frozen=True)
class Operation:
    id: str
    kind: str
    state: str
    feature_views: list[str]
    create_ns: int
    update_ns: int
    end_ns: int | None
    total_chunks: int
    done_chunks: int
    rows_written: int
    resumed_count: int
    error: OperationError | None
    result: dict[str, Any] | None

    @property
    def name(self) -> str:
        return f"operations/{self.id}"

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES


@dataclass(frozen=True)
class MaterializeRequest:
    views: list[str]
    start_ns: int | None  # None: from the earliest event
    end_ns: int


@dataclass(frozen=True)
class HistoricalRequest:
    features: list[tuple[str, str]]  # (view, feature)
    full_feature_names: bool
    # The entity rows as columns: each join key's values, and EVENT_TIMESTAMP
    # in ns since the epoch.
    entity_columns: dict[str, list[Any]]


def _now_ns() -> int:
    return time.time_ns()


# ---- the log -----------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    request TEXT NOT NULL,
    plan TEXT,
    state TEXT NOT NULL,
    feature_views TEXT NOT NULL,
    total_chunks INTEGER NOT NULL DEFAULT 0,
    done_chunks INTEGER NOT NULL DEFAULT 0,
    rows_written INTEGER NOT NULL DEFAULT 0,
    resumed_count INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    create_ns INTEGER NOT NULL,
    update_ns INTEGER NOT NULL,
    end_ns INTEGER,
    error TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS operations_state ON operations (state, seq);
"""
_COLUMNS = (
    "id, kind, state, feature_views, create_ns, update_ns, end_ns, total_chunks, "
    "done_chunks, rows_written, resumed_count, error, result"
)


class OperationLog:
    """The operations, in ``path`` (SQLite). Every method is a short
    transaction; call them off the event loop."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, *args: Any) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def add(self, kind: str, request: dict[str, Any], views: list[str], max_pending: int) -> str:
        """A new PENDING operation's id; RESOURCE_EXHAUSTED when
        ``max_pending`` operations already wait."""
        op_id = str(uuid.uuid4())
        now = _now_ns()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (pending,) = self._db.execute(
                    "SELECT COUNT(*) FROM operations WHERE state = ?", (PENDING,)
                ).fetchone()
                if pending >= max_pending:
                    raise ResourceExhausted(
                        f"{pending} operations are waiting to run, the most this service queues",
                        [
                            QuotaViolation(
                                "operations", f"at most {max_pending} operations may wait"
                            )
                        ],
                        retry_after_s=5.0,
                        pending=pending,
                    )
                self._db.execute(
                    "INSERT INTO operations (id, kind, request, state, feature_views, create_ns,"
                    " update_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (op_id, kind, json.dumps(request), PENDING, json.dumps(views), now, now),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return op_id

    def get(self, op_id: str) -> Operation | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM operations WHERE id = ?", (op_id,)
            ).fetchone()
        return _operation(row) if row else None

    def page(self, page_size: int, page_token: str) -> tuple[list[Operation], str]:
        """Newest first; the token is the position of the page's last
        operation (keyset: operations added meanwhile do not shift pages)."""
        if page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before = MAX_TIME_NS
        if page_token:
            if not (page_token.isascii() and page_token.isdigit() and len(page_token) <= 18):
                raise InvalidArgument.field("page_token", "is not a token this list returned")
            before = int(page_token)
        with self._lock:
            rows = self._db.execute(
                f"SELECT seq, {_COLUMNS} FROM operations WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                (before, size + 1),
            ).fetchall()
        page = rows[:size]
        token = str(page[-1][0]) if len(rows) > size else ""
        return [_operation(row[1:]) for row in page], token

    def resume_interrupted(self) -> int:
        """At start: every operation left PENDING or RUNNING is resumed once
        more; how many."""
        return self._write(
            "UPDATE operations SET resumed_count = resumed_count + 1, update_ns = ?"
            " WHERE state IN (?, ?)",
            _now_ns(),
            PENDING,
            RUNNING,
        )

    def next_runnable(self) -> tuple[Operation, dict[str, Any], list[Any] | None] | None:
        """The oldest operation not done: (it, its request, its plan or None)."""
        with self._lock:
            row = self._db.execute(
                f"SELECT request, plan, {_COLUMNS} FROM operations WHERE state IN (?, ?)"
                " ORDER BY seq LIMIT 1",
                (PENDING, RUNNING),
            ).fetchone()
        if row is None:
            return None
        return _operation(row[2:]), json.loads(row[0]), json.loads(row[1]) if row[1] else None

    def start(self, op_id: str, plan: list[Any], total_chunks: int) -> bool:
        """PENDING or RUNNING -> RUNNING with ``plan`` from its first chunk;
        False when it was cancelled meanwhile."""
        return (
            self._write(
                "UPDATE operations SET state = ?, plan = ?, total_chunks = ?, done_chunks = 0,"
                " rows_written = 0, update_ns = ? WHERE id = ? AND state IN (?, ?)",
                RUNNING,
                json.dumps(plan),
                total_chunks,
                _now_ns(),
                op_id,
                PENDING,
                RUNNING,
            )
            == 1
        )

    def progress(self, op_id: str, done_chunks: int, rows_written: int) -> bool:
        """Commits a finished chunk; whether a cancel was asked for."""
        with self._lock:
            self._db.execute(
                "UPDATE operations SET done_chunks = ?, rows_written = ?, update_ns = ?"
                " WHERE id = ?",
                (done_chunks, rows_written, _now_ns(), op_id),
            )
            (cancel,) = self._db.execute(
                "SELECT cancel_requested FROM operations WHERE id = ?", (op_id,)
            ).fetchone()
        return bool(cancel)

    def finish(
        self,
        op_id: str,
        state: str,
        error: OperationError | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        now = _now_ns()
        self._write(
            "UPDATE operations SET state = ?, error = ?, result = ?, update_ns = ?, end_ns = ?"
            " WHERE id = ? AND state NOT IN (?, ?, ?)",
            state,
            json.dumps(error.__dict__) if error else None,
            json.dumps(result) if result is not None else None,
            now,
            now,
            op_id,
            *DONE_STATES,
        )

    def request_cancel(self, op_id: str) -> bool:
        """Asks ``op_id`` to stop: a PENDING one is CANCELLED at once, a
        RUNNING one after its current chunk, a done one is left as it is.
        False when there is no such operation."""
        now = _now_ns()
        error = _cancelled(op_id)
        with self._lock:
            found = self._db.execute(
                "UPDATE operations SET cancel_requested = 1 WHERE id = ?", (op_id,)
            ).rowcount
            self._db.execute(
                "UPDATE operations SET state = ?, error = ?, update_ns = ?, end_ns = ?"
                " WHERE id = ? AND state = ?",
                (CANCELLED, json.dumps(error.__dict__), now, now, op_id, PENDING),
            )
        return found == 1


def _cancelled(op_id: str) -> OperationError:
    return OperationError(
        "CANCELLED",
        errors_pb2.ERROR_REASON_OPERATION_CANCELLED,
        f"operation {op_id!r} was cancelled",
        {"operation": op_id},
    )


def _operation(row: Sequence[Any]) -> Operation:
    (
        op_id,
        kind,
        state,
        views,
        create_ns,
        update_ns,
        end_ns,
        total,
        done,
        rows,
        resumed,
        error,
        result,
    ) = row
    return Operation(
        id=op_id,
        kind=kind,
        state=state,
        feature_views=json.loads(views),
        create_ns=create_ns,
        update_ns=update_ns,
        end_ns=end_ns,
        total_chunks=total,
        done_chunks=done,
        rows_written=rows,
        resumed_count=resumed,
        error=OperationError(**json.loads(error)) if error else None,
        result=json.loads(result) if result else None,
    )


# ---- the computation of one chunk ------------------------------------------------------


class SourceEvents:
    """A source's events in event-time order (stable: events of equal time
    keep their order in the source, which ``last`` breaks ties by), sliced
    by time without copying the whole."""

    def __init__(self, frame: pd.DataFrame, timestamp_field: str) -> None:
        ns = pd.to_datetime(frame[timestamp_field], utc=True).astype("int64").to_numpy()
        order = np.argsort(ns, kind="stable")
        self.frame = frame.iloc[order].reset_index(drop=True)
        self.times = ns[order]

    def between(self, lo: int, hi: int) -> pd.DataFrame:
        """The events with lo <= event time < hi."""
        first, last = np.searchsorted(self.times, [lo, hi], side="left")
        return self.frame.iloc[first:last]

    def upto(self, hi: int) -> pd.DataFrame:
        """The events with event time <= hi."""
        return self.frame.iloc[: np.searchsorted(self.times, hi, side="right")]


def source_events(store: FeatureStore, source_name: str) -> SourceEvents:
    """A source's events (the parquet of a batch source, the event log of a
    stream source), in time order."""
    source = store.definitions.sources[source_name]
    return SourceEvents(store.source_events(source), source.timestamp_field)


def _lead_ns(view: FeatureView) -> int:
    """How far before a row's time its events go: the longest window."""
    if not view.windowed:
        return 0
    return max(pd.Timedelta(a.window).value for a in view.aggregations)


def plan_chunks(
    events: SourceEvents, start_ns: int | None, end_ns: int, chunk_events: int, min_span_ns: int = 0
) -> list[int]:
    """Chunk bounds over row times [start, end]: [b0, b1), [b1, b2), ... with
    about ``chunk_events`` events in each (at least one chunk), and none
    shorter than ``min_span_ns`` (a windowed view's longest window: the
    events before a chunk that its first rows need are then at most as many
    as the chunk's own)."""
    if start_ns is None:
        start_ns = int(events.times[0]) if len(events.times) else end_ns
    start_ns = min(start_ns, end_ns)
    first, last = np.searchsorted(events.times, [start_ns, end_ns], side="right")
    bounds = [start_ns]
    for t in events.times[first:last][chunk_events::chunk_events]:
        if int(t) >= bounds[-1] + max(min_span_ns, 1) and int(t) <= end_ns:
            bounds.append(int(t))
    return [*bounds, end_ns + 1]


def chunk_rows(
    defs: Definitions, view: FeatureView, events: SourceEvents, lo: int, hi: int
) -> pd.DataFrame:
    """``view``'s rows with lo <= event time < hi, computed from the events
    they need only (exactly the rows the whole computation has there)."""
    needed = events.between(lo - _lead_ns(view), hi)
    if needed.empty:
        return pd.DataFrame()
    rows = compute_view(defs, view, needed)
    times = rows[EVENT_TIMESTAMP].astype("int64")
    return rows[(times >= lo) & (times < hi)]


def latest_per_entity(defs: Definitions, view: FeatureView, rows: pd.DataFrame) -> int:
    """How many rows a write of ``rows`` puts online (one per entity)."""
    return 0 if rows.empty else int(rows.drop_duplicates(defs.join_keys(view)).shape[0])


def materialize_view(
    store: FeatureStore,
    view_name: str,
    start: datetime | None,
    end: datetime,
    chunk_events: int,
) -> int:
    """The synchronous Materialize of one view (the demo's, and the store's
    ``materialize``), chunk by chunk; the rows computed in the range."""
    defs = store.definitions
    view = defs.feature_views[view_name]
    events = source_events(store, view.source)
    bounds = plan_chunks(
        events,
        None if start is None else pd.Timestamp(start).value,
        pd.Timestamp(end).value,
        chunk_events,
        _lead_ns(view),
    )
    computed = 0
    for lo, hi in itertools.pairwise(bounds):
        rows = chunk_rows(defs, view, events, lo, hi)
        store.write(view_name, rows)
        computed += len(rows)
    return computed


# ---- the runner ------------------------------------------------------------------------


class _Stopping(Exception):
    """The service is stopping: the operation stays where it is, to resume."""


class OperationRunner:
    """Runs the operations of ``operations.db`` in ``store.root``, one at a
    time, in the background; see the module docstring."""

    def __init__(
        self,
        store: FeatureStore,
        feast: FeastThread,
        *,
        store_errors: tuple[type[BaseException], ...] = (),
        max_pending: int = 16,
        chunk_events: int = 50_000,
        store_retries: int = 3,
        retry_base_s: float = 0.5,
    ) -> None:
        self.store = store
        self.feast = feast
        self.log = OperationLog(store.root / "operations.db")
        self.store_errors = store_errors
        self.max_pending = max_pending
        self.chunk_events = chunk_events
        self.store_retries = store_retries
        self.retry_base_s = retry_base_s
        self.historical_dir = store.root / "historical"
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------

    async def start(self) -> int:
        """Resumes what a previous process left undone and starts the loop;
        how many operations were resumed."""
        resumed = await asyncio.to_thread(self.log.resume_interrupted)
        if resumed:
            log.info("resuming operations", extra={"operations": resumed})
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return resumed

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Lets the current chunk finish (it is committed; the operation
        resumes at the next start), then stops."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except TimeoutError:
                log.warning("an operation's chunk did not finish in time; it will be redone")
        await asyncio.to_thread(self.log.close)

    # ---- requests ------------------------------------------------------------------

    async def materialize(self, request: MaterializeRequest) -> Operation:
        return await self._add(MATERIALIZE, request.__dict__, request.views)

    async def historical(self, request: HistoricalRequest) -> Operation:
        views = list(dict.fromkeys(v for v, _ in request.features))
        return await self._add(HISTORICAL_FEATURES, request.__dict__, views)

    async def _add(self, kind: str, request: dict[str, Any], views: list[str]) -> Operation:
        op_id = await asyncio.to_thread(self.log.add, kind, request, views, self.max_pending)
        self._wake.set()
        operation = await self.get(op_id)
        assert operation is not None
        return operation

    async def get(self, op_id: str) -> Operation | None:
        return await asyncio.to_thread(self.log.get, op_id)

    async def page(self, page_size: int, page_token: str) -> tuple[list[Operation], str]:
        return await asyncio.to_thread(self.log.page, page_size, page_token)

    async def cancel(self, op_id: str) -> Operation | None:
        if not await asyncio.to_thread(self.log.request_cancel, op_id):
            return None
        return await self.get(op_id)

    # ---- running -------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            # Cleared before the log is read, so a wake-up (a new operation,
            # or stop) that comes while it is read is not lost.
            self._wake.clear()
            try:
                job = await asyncio.to_thread(self.log.next_runnable)
            except sqlite3.Error:
                log.exception("the operations log cannot be read; trying again")
                await asyncio.sleep(1.0)
                continue
            if job is None:
                await self._wake.wait()
                continue
            operation, request, plan = job
            try:
                if operation.kind == MATERIALIZE:
                    await self._materialize(operation, MaterializeRequest(**request), plan)
                else:
                    await self._historical(operation, request)
            except _Stopping:
                return
            except MlmeshError as error:
                await self._finish(operation.id, FAILED, OperationError.of(error))
            except Exception as error:
                log.exception("operation failed", extra={"operation": operation.id})
                failure = OperationError(
                    "INTERNAL",
                    errors_pb2.ERROR_REASON_INTERNAL,
                    f"operation failed ({type(error).__name__})",
                )
                await self._finish(operation.id, FAILED, failure)

    async def _finish(
        self,
        op_id: str,
        state: str,
        error: OperationError | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        await asyncio.to_thread(self.log.finish, op_id, state, error, result)

    async def _committed(self, op_id: str, done: int, total: int, rows: int) -> None:
        """Commits a chunk; stops the operation when cancelled (unless that
        was its last chunk) or when the service stops."""
        cancelled = await asyncio.to_thread(self.log.progress, op_id, done, rows)
        if cancelled and done < total:
            await self._finish(op_id, CANCELLED, _cancelled(op_id))
            raise _Cancelled
        if self._stopping and done < total:
            raise _Stopping

    async def _write(self, view_name: str, rows: pd.DataFrame) -> None:
        """``rows`` to the online store, retried while it cannot be reached;
        then UNAVAILABLE."""
        for attempt in range(self.store_retries + 1):
            try:
                await self.feast.run(self.store.write, view_name, rows)
                return
            except self.store_errors as error:
                if attempt == self.store_retries or self._stopping:
                    raise Unavailable(
                        f"the online store is unreachable ({type(error).__name__})",
                        retry_after_s=1.0,
                    ) from error
                await asyncio.sleep(self.retry_base_s * 2**attempt)

    async def _events(self, read: dict[str, SourceEvents], view: FeatureView) -> SourceEvents:
        """``view``'s source's events, read once per operation (``read``
        holds those read so far: views may share a source)."""
        if view.source not in read:
            read[view.source] = await asyncio.to_thread(source_events, self.store, view.source)
        return read[view.source]

    async def _materialize(
        self, operation: Operation, request: MaterializeRequest, plan: list[Any] | None
    ) -> None:
        defs = self.store.definitions
        events: dict[str, SourceEvents] = {}
        views = [_view(defs, name) for name in request.views]
        done, rows = operation.done_chunks, operation.rows_written
        if plan is None or operation.state == PENDING:
            plan = []
            for view in views:
                view_events = await self._events(events, view)
                bounds = await asyncio.to_thread(
                    plan_chunks,
                    view_events,
                    request.start_ns,
                    request.end_ns,
                    self.chunk_events,
                    _lead_ns(view),
                )
                plan.append([view.name, bounds])
            total = sum(len(bounds) - 1 for _, bounds in plan)
            if not await asyncio.to_thread(self.log.start, operation.id, plan, total):
                return  # cancelled before it started
            done, rows = 0, 0
        chunks = [(name, lo, hi) for name, bounds in plan for lo, hi in itertools.pairwise(bounds)]
        try:
            for index in range(done, len(chunks)):
                name, lo, hi = chunks[index]
                view = _view(defs, name)
                view_events = await self._events(events, view)
                computed = await asyncio.to_thread(chunk_rows, defs, view, view_events, lo, hi)
                await self._write(name, computed)
                rows += latest_per_entity(defs, view, computed)
                await self._committed(operation.id, index + 1, len(chunks), rows)
        except _Cancelled:
            return
        start_ns = plan[0][1][0] if plan else request.end_ns
        await self._finish(
            operation.id,
            SUCCEEDED,
            result={"rows_written": rows, "start_ns": start_ns, "end_ns": request.end_ns},
        )

    async def _historical(self, operation: Operation, request: dict[str, Any]) -> None:
        historical = HistoricalRequest(
            features=[(v, f) for v, f in request["features"]],
            full_feature_names=request["full_feature_names"],
            entity_columns=request["entity_columns"],
        )
        defs = self.store.definitions
        views = list(dict.fromkeys(v for v, _ in historical.features))
        if not await asyncio.to_thread(self.log.start, operation.id, [], len(views) + 1):
            return
        entity_rows = pd.DataFrame(historical.entity_columns)
        entity_rows[EVENT_TIMESTAMP] = pd.to_datetime(entity_rows[EVENT_TIMESTAMP], utc=True)
        latest = int(entity_rows[EVENT_TIMESTAMP].astype("int64").max())
        computed: dict[str, pd.DataFrame] = {}
        events: dict[str, SourceEvents] = {}  # per source: views may share one
        try:
            for index, name in enumerate(views):
                view = _view(defs, name)
                view_events = await self._events(events, view)
                computed[name] = await asyncio.to_thread(
                    compute_view, defs, view, view_events.upto(latest)
                )
                await self._committed(operation.id, index + 1, len(views) + 1, 0)
            path = await asyncio.to_thread(
                self._write_historical, operation.id, defs, entity_rows, historical, computed
            )
            await self._committed(operation.id, len(views) + 1, len(views) + 1, len(entity_rows))
        except _Cancelled:
            return
        names = [
            f"{v}__{f}" if historical.full_feature_names else f for v, f in historical.features
        ]
        await self._finish(
            operation.id,
            SUCCEEDED,
            result={
                "output_uri": path.as_uri(),
                "row_count": len(entity_rows),
                "feature_names": names,
            },
        )

    def _write_historical(
        self,
        op_id: str,
        defs: Definitions,
        entity_rows: pd.DataFrame,
        request: HistoricalRequest,
        computed: dict[str, pd.DataFrame],
    ) -> Path:
        joined = point_in_time_join(
            defs, entity_rows, request.features, computed, request.full_feature_names
        )
        self.historical_dir.mkdir(exist_ok=True)
        path = self.historical_dir / f"{op_id}.parquet"
        partial = self.historical_dir / f".{op_id}.parquet.tmp"
        joined.to_parquet(partial, index=False)
        os.replace(partial, path)
        return path


class _Cancelled(Exception):
    """The operation was cancelled (and marked so)."""


def _view(defs: Definitions, name: str) -> FeatureView:
    view = defs.feature_views.get(name)
    if view is None:
        raise NotFound("feature view", name, f"feature view {name!r} was removed meanwhile")
    return view

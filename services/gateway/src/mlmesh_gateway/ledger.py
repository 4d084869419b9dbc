"""The usage ledger: one durable event per request, written once.

Idempotent by request id: a retried request (same id) is recorded once.
UsageService and quotas read totals from it (quotas through a per-key running
total, see ``UsageLedger.tokens_since``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import cast

import sqlalchemy as sa
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.database import Database
from sqlalchemy import exc
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

log = logging.getLogger("mlmesh.gateway.ledger")
metadata = sa.MetaData()
usage_events = sa.Table(
    "usage_events",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("service", sa.Integer, nullable=False),
    sa.Column("model", sa.String(63), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("region", sa.String(63), nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("input_items", sa.BigInteger, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    # Indexes (migrations): ix_usage_time (create_time), ix_usage_key_time
    # (key_id, create_time) for a key's usage over its quota period.
)


shadow_results = sa.Table(
    "shadow_results",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("experiment", sa.String(63), nullable=False),
    sa.Column("model", sa.String(63), nullable=False),
    sa.Column("primary_version", sa.BigInteger, nullable=False),
    sa.Column("shadow_version", sa.BigInteger, nullable=False),
    sa.Column("max_abs_diff", sa.Float, nullable=False),
    sa.Column("agreed", sa.Boolean, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class UsageEvent:
    request_id: str
    key_id: str
    service: int
    model: str
    version: int = 0
    region: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_items: int = 0
    latency_ms: float = 0.0
    status: str = "OK"


@dataclass
class _KeyTotal:
    """A key's tokens since ``start``: read from the database at ``loaded``
    (monotonic), plus what this process recorded for the key since."""

    start: dt.datetime
    tokens: int
    loaded: float


class UsageLedger:
    """Usage events, written in batches off the request path.

    ``record`` queues an event; a background flush writes what is queued in
    one transaction every ``flush_s`` (100 ms) or as soon as ``batch`` events
    wait, with insert-or-ignore on the request id (a retried request is
    recorded once, whichever replica saw it). Reads flush first, so a replica
    reads its own writes; shutdown flushes what is left.

    Quota checks (``tokens_since``) read a per-key running total instead of
    the table: loaded from the database at most every ``refresh_s`` (5 s)
    per key, plus the tokens this process records in between.
    """

    def __init__(
        self,
        database: Database,
        flush_s: float = 0.1,
        batch: int = 500,
        refresh_s: float = 5.0,
    ) -> None:
        self.db = database
        self.flush_s = flush_s
        self.batch = batch
        self.refresh_s = refresh_s
        self._pending: list[dict[str, object]] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._totals: dict[str, _KeyTotal] = {}  # key id -> its quota period's total

    async def record(self, event: UsageEvent) -> None:
        self._pending.append({**event.__dict__, "create_time": dt.datetime.now(dt.UTC)})
        total = self._totals.get(event.key_id)
        if total is not None:  # a key with a quota: keep its running total
            total.tokens += event.prompt_tokens + event.completion_tokens
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        if len(self._pending) >= self.batch:
            self._wake.set()

    async def _flush_loop(self) -> None:
        while self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as error:  # database away: keep the events, retry
                log.warning(
                    "usage events not written yet (%d waiting): %s", len(self._pending), error
                )
                await asyncio.sleep(1.0)

    async def flush(self) -> None:
        async with self._lock:
            await self._write_pending()

    async def _write_pending(self) -> None:
        """Writes what is queued; the caller holds ``_lock``."""
        rows, self._pending = self._pending, []
        if not rows:
            return
        insert = (sqlite_insert if self.db.is_sqlite else postgres_insert)(usage_events)
        try:
            async with self.db.write() as c:
                await c.execute(insert.on_conflict_do_nothing(index_elements=["request_id"]), rows)
        except BaseException:
            self._pending[:0] = rows  # not written: keep them, in order
            raise

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        if self._flusher is not None:
            self._flusher.cancel()

    async def record_shadow(
        self,
        request_id: str,
        experiment: str,
        model: str,
        primary_version: int,
        shadow_version: int,
        max_abs_diff: float,
        agreed: bool,
    ) -> None:
        """One shadow comparison (where primary and shadow answers disagree
        beyond the tolerance, ``agreed`` is False), for later review."""
        try:
            async with self.db.write() as c:
                await c.execute(
                    shadow_results.insert().values(
                        request_id=request_id,
                        experiment=experiment,
                        model=model,
                        primary_version=primary_version,
                        shadow_version=shadow_version,
                        max_abs_diff=max_abs_diff,
                        agreed=agreed,
                        create_time=dt.datetime.now(dt.UTC),
                    )
                )
        except exc.IntegrityError:
            return

    async def tokens_since(self, key_id: str, start: dt.datetime) -> int:
        """Tokens (prompt + completion) the key used since ``start`` (the
        start of its current quota period: events are recorded at "now").

        Called on every Generate of a key with a quota, so it reads the
        database at most once every ``refresh_s`` per key (and when ``start``
        changes, i.e. a new period): it flushes what is queued, then sums the
        key's events since ``start`` (index ix_usage_key_time). In between it
        answers from memory: that total plus the tokens this process has
        recorded since. Staleness: what other replicas recorded is seen
        within ``refresh_s`` (plus their ``flush_s``), so a quota shared by
        replicas is soft by what the others used in that time; this process's
        own usage is always counted (a request id recorded twice here counts
        twice until the next read, never less).
        """
        total = self._totals.get(key_id)
        if total is not None and total.start == start and self._fresh(total):
            return total.tokens
        async with self._lock:
            total = self._totals.get(key_id)  # another call may have read it meanwhile
            if total is not None and total.start == start and self._fresh(total):
                return total.tokens
            loaded = time.monotonic()
            await self._write_pending()
            e = usage_events
            stmt = sa.select(
                sa.func.coalesce(sa.func.sum(e.c.prompt_tokens + e.c.completion_tokens), 0)
            ).where(e.c.key_id == key_id, e.c.create_time >= start)
            async with self.db.read() as c:
                tokens = int(await c.scalar(stmt) or 0)
            # Holding the lock, nothing was written since that read: what is
            # queued now was recorded meanwhile and is not in it yet.
            tokens += sum(
                cast(int, row["prompt_tokens"]) + cast(int, row["completion_tokens"])
                for row in self._pending
                if row["key_id"] == key_id
            )
            self._totals[key_id] = _KeyTotal(start, tokens, loaded)
            return tokens

    def _fresh(self, total: _KeyTotal) -> bool:
        return time.monotonic() - total.loaded < self.refresh_s

    async def buckets(
        self,
        start: dt.datetime,
        end: dt.datetime,
        key_ids: list[str],
        models: list[str],
        granularity: int,
    ) -> list[pb.UsageBucket]:
        await self.flush()
        e = usage_events
        stmt = sa.select(e).where(e.c.create_time >= start, e.c.create_time < end)
        if key_ids:
            stmt = stmt.where(e.c.key_id.in_(key_ids))
        if models:
            stmt = stmt.where(e.c.model.in_(models))
        totals: dict[tuple[str, int, str, dt.datetime], pb.UsageBucket] = defaultdict(
            pb.UsageBucket
        )
        async with self.db.read() as c:
            rows = (await c.execute(stmt)).all()
        for row in rows:
            when = (
                row.create_time
                if row.create_time.tzinfo
                else row.create_time.replace(tzinfo=dt.UTC)
            )
            bucket_start, bucket_end = _bucket(when, start, end, granularity)
            bucket = totals[(row.key_id, row.service, row.model, bucket_start)]
            if not bucket.key_id:
                bucket.key_id, bucket.service, bucket.model = row.key_id, row.service, row.model
                bucket.start_time.FromDatetime(bucket_start)
                bucket.end_time.FromDatetime(bucket_end)
            bucket.request_count += 1
            bucket.error_count += row.status != "OK"
            bucket.usage.prompt_tokens += row.prompt_tokens
            bucket.usage.completion_tokens += row.completion_tokens
            bucket.usage.input_items += row.input_items
        return [totals[k] for k in sorted(totals)]


def _bucket(
    when: dt.datetime, start: dt.datetime, end: dt.datetime, granularity: int
) -> tuple[dt.datetime, dt.datetime]:
    if granularity == pb.USAGE_GRANULARITY_HOUR:
        first = when.replace(minute=0, second=0, microsecond=0)
        return first, first + dt.timedelta(hours=1)
    if granularity == pb.USAGE_GRANULARITY_DAY:
        first = when.replace(hour=0, minute=0, second=0, microsecond=0)
        return first, first + dt.timedelta(days=1)
    if granularity == pb.USAGE_GRANULARITY_MONTH:
        first = when.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = (first + dt.timedelta(days=32)).replace(day=1)
        return first, following
    return start, end

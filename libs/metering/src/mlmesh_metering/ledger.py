"""The usage ledger: one durable row per usage event, written once.

The row's key is the server-made event id (insert-or-ignore on it: a flush
that is retried records each event once). The caller's request id is its own
indexed column, for tracing; two calls that reuse one are two rows, each
under its own key. UsageService and quotas read totals from it (quotas
through a per-key running total, see ``UsageLedger.tokens_since``).

The gateway is the ledger's only writer; other services reach it through
UsageService.RecordUsage (``mlmesh_metering.remote.RemoteUsageSink``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import sqlalchemy as sa
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.database import Database
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from mlmesh_metering.batcher import UsageBatcher
from mlmesh_metering.events import UsageEvent

log = logging.getLogger("mlmesh.metering.ledger")
metadata = sa.MetaData()
# The schema as the gateway's migrations leave it (0005_usage_event_identity).
usage_events = sa.Table(
    "usage_events",
    metadata,
    sa.Column("event_id", sa.String(64), primary_key=True),
    sa.Column("call_id", sa.String(64), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("service", sa.Integer, nullable=False),
    sa.Column("model", sa.String(63), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("region", sa.String(63), nullable=False),
    sa.Column("unit", sa.String(16), nullable=False),
    sa.Column("quantity", sa.BigInteger, nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("input_items", sa.BigInteger, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_usage_time", "create_time"),
    # A key's usage over its quota period.
    sa.Index("ix_usage_key_time", "key_id", "create_time"),
    # A caller's request id, for tracing.
    sa.Index("ix_usage_request", "request_id"),
)


@dataclass
class _KeyTotal:
    """A key's tokens since ``start``: read from the database at ``loaded``
    (monotonic), plus what this process recorded for the key since."""

    start: dt.datetime
    tokens: int
    loaded: float


def _row(event: UsageEvent, now: dt.datetime) -> dict[str, object]:
    return {
        "event_id": event.event_id,
        "call_id": event.call_id,
        "request_id": event.request_id,
        "key_id": event.key_id,
        "service": event.service,
        "model": event.model,
        "version": event.version,
        "region": event.region,
        "unit": event.unit,
        "quantity": event.quantity,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "input_items": event.input_items,
        "latency_ms": event.latency_ms,
        "status": event.status,
        "create_time": now,
    }


class UsageLedger(UsageBatcher):
    """Usage events in the ledger's database, written in batches off the
    request path (see ``UsageBatcher``: outages retried with backoff, a
    refused event dropped on its own). Reads flush first, so a replica reads
    its own writes; shutdown flushes what is left.

    Quota checks (``tokens_since``) read a per-key running total instead of
    the table: loaded from the database at most every ``refresh_s`` (5 s)
    per key, plus the tokens this process records in between.
    """

    name = "ledger"

    def __init__(
        self,
        database: Database,
        flush_s: float = 0.1,
        batch: int = 500,
        refresh_s: float = 5.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        super().__init__(flush_s, batch, backoff_s, max_backoff_s)
        self.db = database
        self.refresh_s = refresh_s
        self._totals: dict[str, _KeyTotal] = {}  # key id -> its quota period's total
        self._times: dict[str, dt.datetime] = {}  # event id -> when it was recorded

    def _recorded(self, event: UsageEvent) -> None:
        self._times[event.event_id] = dt.datetime.now(dt.UTC)
        total = self._totals.get(event.key_id)
        if total is not None:  # a key with a quota: keep its running total
            total.tokens += event.tokens

    async def _write(self, events: list[UsageEvent]) -> None:
        now = dt.datetime.now(dt.UTC)
        rows = [_row(e, self._times.get(e.event_id, now)) for e in events]
        insert = (sqlite_insert if self.db.is_sqlite else postgres_insert)(usage_events)
        async with self.db.write() as c:
            await c.execute(insert.on_conflict_do_nothing(index_elements=["event_id"]), rows)
        for event in events:
            self._times.pop(event.event_id, None)

    async def _write_one_by_one(self, events: list[UsageEvent]) -> None:
        await super()._write_one_by_one(events)
        for event in events:  # written or dropped: either way not pending
            self._times.pop(event.event_id, None)

    async def tokens_since(self, key_id: str, start: dt.datetime) -> int:
        """Tokens the key used since ``start`` (the start of its current
        quota period: events are recorded at "now").

        Called on every Generate of a key with a quota, so it reads the
        database at most once every ``refresh_s`` per key (and when ``start``
        changes, i.e. a new period): it flushes what is queued, then sums the
        key's token events since ``start`` (index ix_usage_key_time). In
        between it answers from memory: that total plus the tokens this
        process has recorded since. Staleness: what other replicas recorded
        is seen within ``refresh_s`` (plus their ``flush_s``), so a quota
        shared by replicas is soft by what the others used in that time;
        this process's own usage is always counted.
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
            async with self.db.read() as c:
                tokens = int(await c.scalar(tokens_since_query(key_id, start)) or 0)
            # Holding the lock, nothing was written since that read: what is
            # queued now was recorded meanwhile and is not in it yet.
            tokens += sum(event.tokens for event in self._pending if event.key_id == key_id)
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
            if row.unit == "tokens" and not (row.prompt_tokens or row.completion_tokens):
                bucket.usage.completion_tokens += row.quantity  # a service's tokens, unsplit
            bucket.usage.prompt_tokens += row.prompt_tokens
            bucket.usage.completion_tokens += row.completion_tokens
            # Other units (rows, vectors, items) are the service's items.
            bucket.usage.input_items += row.input_items or (
                row.quantity if row.unit != "tokens" else 0
            )
        return [totals[k] for k in sorted(totals)]


def tokens_since_query(key_id: str, start: dt.datetime) -> sa.Select[tuple[int]]:
    """The quota read: a key's token events since ``start`` (index
    ix_usage_key_time)."""
    e = usage_events
    return sa.select(sa.func.coalesce(sa.func.sum(e.c.quantity), 0)).where(
        e.c.key_id == key_id, e.c.create_time >= start, e.c.unit == "tokens"
    )


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

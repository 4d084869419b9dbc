"""The usage ledger: one durable event per request, written once.

Idempotent by request id: a retried request (same id) is recorded once.
UsageService and quotas read totals from it.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass

import sqlalchemy as sa
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.database import Database
from sqlalchemy import exc

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


class UsageLedger:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def record(self, event: UsageEvent) -> bool:
        """Writes the event; False if this request id was already recorded."""
        try:
            async with self.db.write() as c:
                await c.execute(
                    usage_events.insert().values(
                        **event.__dict__, create_time=dt.datetime.now(dt.UTC)
                    )
                )
        except exc.IntegrityError:
            return False
        return True

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
        """Tokens (prompt + completion) the key used since ``start``."""
        e = usage_events
        stmt = sa.select(
            sa.func.coalesce(sa.func.sum(e.c.prompt_tokens + e.c.completion_tokens), 0)
        ).where(e.c.key_id == key_id, e.c.create_time >= start)
        async with self.db.read() as c:
            return int(await c.scalar(stmt) or 0)

    async def buckets(
        self,
        start: dt.datetime,
        end: dt.datetime,
        key_ids: list[str],
        models: list[str],
        granularity: int,
    ) -> list[pb.UsageBucket]:
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

"""The usage ledger's quota totals: a per-key running total, refreshed from
the database at most every refresh_s (SQLite in a temp dir, real migrations)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt

import pytest
import sqlalchemy as sa
from mlmesh_chassis.database import Database
from mlmesh_metering import UsageEvent
from mlmesh_metering.ledger import UsageLedger, tokens_since_query
from sqlalchemy.dialects import sqlite


@pytest.fixture
def reads(monkeypatch):
    """Counts the database reads of each ledger: ``reads(ledger)`` -> a list of
    one entry per read."""

    def count(ledger: UsageLedger) -> list[int]:
        seen: list[int] = []
        read = ledger.db.read

        @contextlib.asynccontextmanager
        async def counted():  # type: ignore[no-untyped-def]
            seen.append(1)
            async with read() as c:
                yield c

        monkeypatch.setattr(ledger.db, "read", counted)
        return seen

    return count


def _event(call_id: str, key_id: str, prompt: int, completion: int) -> UsageEvent:
    return UsageEvent(
        call_id=call_id,
        key_id=key_id,
        service=1,
        model="tiny-llama",
        unit="tokens",
        quantity=prompt + completion,
        prompt_tokens=prompt,
        completion_tokens=completion,
    )


def _today() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def _in_database(db: Database, key_id: str) -> int:
    async with db.read() as c:
        return int(
            await c.scalar(
                sa.text(
                    "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0)"
                    " FROM usage_events WHERE key_id = :k"
                ),
                {"k": key_id},
            )
        )


async def test_totals_are_right_after_records(database):
    ledger = UsageLedger(database, refresh_s=60.0)
    try:
        start = _today()
        assert await ledger.tokens_since("k1", start) == 0
        await ledger.record(_event("a", "k1", 10, 5))
        await ledger.record(_event("b", "k1", 7, 0))
        await ledger.record(_event("c", "k2", 1000, 1000))  # another key
        assert await ledger.tokens_since("k1", start) == 22
        assert await ledger.tokens_since("k2", start) == 2000
        await ledger.record(_event("d", "k2", 3, 4))
        await ledger.record(_event("e", "k1", 0, 8))
        assert await ledger.tokens_since("k1", start) == 30
        assert await ledger.tokens_since("k2", start) == 2007
        await ledger.flush()
        assert await _in_database(database, "k1") == 30
        assert await _in_database(database, "k2") == 2007
        # A fresh replica reads the same from the database.
        other = UsageLedger(database)
        assert await other.tokens_since("k1", start) == 30
        # Events before the period's start do not count.
        assert await other.tokens_since("k1", start + dt.timedelta(days=1)) == 0
    finally:
        await ledger.close()


async def test_a_second_call_within_the_refresh_interval_reads_nothing(database, reads):
    ledger = UsageLedger(database, refresh_s=60.0)
    seen = reads(ledger)
    try:
        start = _today()
        await ledger.record(_event("a", "k1", 10, 5))
        assert await ledger.tokens_since("k1", start) == 15
        assert len(seen) == 1  # loaded once (after writing what was queued)
        for i in range(50):
            await ledger.record(_event(f"r{i}", "k1", 1, 1))
            assert await ledger.tokens_since("k1", start) == 15 + 2 * (i + 1)
        assert len(seen) == 1
        # Another key, or a new period, is loaded once.
        assert await ledger.tokens_since("k2", start) == 0
        assert await ledger.tokens_since("k2", start) == 0
        assert len(seen) == 2
        assert await ledger.tokens_since("k1", start + dt.timedelta(days=1)) == 0
        assert len(seen) == 3
    finally:
        await ledger.close()


async def test_other_replicas_usage_is_seen_after_the_refresh_interval(database, reads):
    mine = UsageLedger(database, refresh_s=0.3)
    theirs = UsageLedger(database, refresh_s=0.3)
    seen = reads(mine)
    try:
        start = _today()
        await mine.record(_event("m1", "k1", 100, 0))
        assert await mine.tokens_since("k1", start) == 100
        await theirs.record(_event("t1", "k1", 40, 2))
        await theirs.record(_event("m1", "k1", 100, 0))  # a retry: written once
        await theirs.flush()
        await mine.record(_event("m2", "k1", 0, 5))
        # Within the interval: my own usage, not theirs yet.
        assert await mine.tokens_since("k1", start) == 105
        assert len(seen) == 1
        await asyncio.sleep(0.35)
        assert await mine.tokens_since("k1", start) == 147
        assert len(seen) == 2
        assert await theirs.tokens_since("k1", start) == 147
    finally:
        await mine.close()
        await theirs.close()


async def test_events_recorded_while_loading_count_once(database, monkeypatch):
    ledger = UsageLedger(database, refresh_s=0.0)  # reads every time
    read = database.read

    @contextlib.asynccontextmanager
    async def read_while_recording():  # type: ignore[no-untyped-def]
        # A request ends (and is recorded) while the total is being read.
        await ledger.record(_event("late", "k1", 3, 0))
        async with read() as c:
            yield c

    try:
        start = _today()
        await ledger.record(_event("a", "k1", 10, 0))
        monkeypatch.setattr(database, "read", read_while_recording)
        assert await ledger.tokens_since("k1", start) == 13  # the late one, once
        monkeypatch.setattr(database, "read", read)
        assert await ledger.tokens_since("k1", start) == 13
        assert await _in_database(database, "k1") == 13
    finally:
        await ledger.close()


async def test_the_quota_query_uses_the_key_time_index(database):
    if not database.is_sqlite:
        pytest.skip("EXPLAIN QUERY PLAN is SQLite's")
    # The very statement UsageLedger.tokens_since runs, compiled for SQLite.
    query = tokens_since_query("k1", _today())
    compiled = query.compile(dialect=sqlite.dialect(paramstyle="named"))
    async with database.read() as c:
        plan = (await c.execute(sa.text(f"EXPLAIN QUERY PLAN {compiled}"), compiled.params)).all()
    assert "ix_usage_key_time" in " ".join(str(row) for row in plan)

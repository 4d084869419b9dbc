"""The ledger's flush: idempotent by event id, never blocked by one bad
event, never losing events to an outage (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
import sqlalchemy as sa
from mlmesh_chassis.errors import Unavailable
from mlmesh_chassis.metrics import REGISTRY
from mlmesh_metering import UsageEvent
from mlmesh_metering.ledger import UsageLedger, usage_events


def _event(call_id: str, key_id: str = "k1", **fields) -> UsageEvent:
    fields.setdefault("quantity", 5)
    return UsageEvent(call_id=call_id, key_id=key_id, service=1, model="tiny-llama", **fields)


def _dropped() -> float:
    return REGISTRY.get_sample_value("mlmesh_usage_events_dropped_total", {"sink": "ledger"}) or 0


async def _rows(db) -> list:
    async with db.read() as c:
        return (await c.execute(sa.select(usage_events).order_by(usage_events.c.event_id))).all()


async def test_calls_reusing_a_request_id_are_separate_rows(database):
    ledger = UsageLedger(database)
    try:
        for call in ("c1", "c2", "c3"):
            await ledger.record(_event(call, request_id="same", quantity=1000))
        await ledger.record(_event("c4", key_id="k2", request_id="same", quantity=7))
        await ledger.record(_event("c1", request_id="same", quantity=1000))  # a retried write
        await ledger.flush()
        rows = await _rows(database)
    finally:
        await ledger.close()
    assert [(r.event_id, r.key_id, r.request_id, r.quantity) for r in rows] == [
        ("c1", "k1", "same", 1000),
        ("c2", "k1", "same", 1000),
        ("c3", "k1", "same", 1000),
        ("c4", "k2", "same", 7),
    ]


async def test_a_refused_event_is_dropped_alone_and_never_retried(database):
    ledger = UsageLedger(database)
    before = _dropped()
    try:
        await ledger.record(_event("good-1"))
        await ledger.record(_event("bad", key_id=None))  # type: ignore[arg-type]  # NOT NULL
        await ledger.record(_event("good-2"))
        await ledger.flush()
        assert ledger.pending == 0
        await ledger.flush()  # nothing left to retry
    finally:
        await ledger.close()
    assert [r.event_id for r in await _rows(database)] == ["good-1", "good-2"]
    assert _dropped() == before + 1


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgres"], indirect=True)
async def test_postgres_refuses_an_over_long_value_and_the_batch_still_lands(database):
    ledger = UsageLedger(database)
    before = _dropped()
    try:
        await ledger.record(_event("ok-1"))
        await ledger.record(_event("too-long", request_id="x" * 200))  # column is 128
        await ledger.record(_event("ok-2"))
        await ledger.flush()
    finally:
        await ledger.close()
    assert [r.event_id for r in await _rows(database)] == ["ok-1", "ok-2"]
    assert _dropped() == before + 1


async def test_an_outage_keeps_every_event_and_retries_with_backoff(database, monkeypatch):
    ledger = UsageLedger(database, flush_s=0.01, backoff_s=0.05, max_backoff_s=0.2)
    write = database.write
    attempts: list[float] = []

    @contextlib.asynccontextmanager
    async def down():  # type: ignore[no-untyped-def]
        attempts.append(asyncio.get_running_loop().time())
        raise Unavailable("the gateway database is unavailable")
        yield  # pragma: no cover

    monkeypatch.setattr(database, "write", down)
    try:
        for i in range(3):
            await ledger.record(_event(f"e{i}"))
        with pytest.raises(Unavailable):
            await ledger.flush()
        await asyncio.sleep(0.5)
        assert ledger.pending == 3  # nothing dropped
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert len(attempts) < 12 and gaps[-1] >= 0.15  # backing off, not spinning
        monkeypatch.setattr(database, "write", write)
        for _ in range(50):
            if not ledger.pending:
                break
            await asyncio.sleep(0.05)
    finally:
        await ledger.close()
    assert [r.event_id for r in await _rows(database)] == ["e0", "e1", "e2"]

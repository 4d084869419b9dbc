"""The review queue over its table: submit, list, claim, decide, escalate.

Every change is one conditional UPDATE (``... WHERE id = :id AND <the state
the change needs>``), so two reviewers racing cannot both win: the database
decides, and the loser's UPDATE matches no row. A caller whose pre-check
passed but whose UPDATE lost gets ABORTED (CONCURRENT_MODIFICATION); one the
pre-check refuses gets FAILED_PRECONDITION. Both carry the item's state in
their ErrorInfo metadata.

A CLAIMED item whose lease ran out is, for every reader and writer, back in
the state it was claimed from: OPEN, or ESCALATED when it has an escalation
reason (the row keeps CLAIMED until the next change: nothing sweeps).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from mlmesh_chassis.database import Database
from mlmesh_chassis.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
)
from mlmesh_chassis.metrics import REGISTRY
from mlmesh_chassis.pagination import decode_page_token, encode_page_token
from prometheus_client import Counter, Gauge
from sqlalchemy import exc

from mlmesh_review.db import items

log = logging.getLogger("mlmesh.review")

OPEN, CLAIMED, DECIDED, ESCALATED = "OPEN", "CLAIMED", "DECIDED", "ESCALATED"
STATES = (OPEN, CLAIMED, DECIDED, ESCALATED)
SOURCES = ("SHADOW_DISAGREEMENT", "LOW_CONFIDENCE", "USER_REPORT", "CONTENT_CHECK")
VERDICTS = ("PRIMARY_CORRECT", "ALTERNATIVE_CORRECT", "BOTH_CORRECT", "BOTH_WRONG", "OTHER")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# A page of ListItems holds items of at most this many characters of text
# in all (always at least one item): a character is at most 4 bytes of
# UTF-8, so a page stays under the 16 MiB message limit however large the
# items are (up to ~130 KiB of text each; 500 of them would not fit).
PAGE_CHARS = 3 * 1024 * 1024
MAX_EXPORT_ITEMS = 10_000
_ITEM_ID = re.compile(r"[0-9a-f]{24}")

QUEUE_DEPTH = Gauge(
    "mlmesh_review_items",
    "Review items by state (an expired claim counts as the state it was claimed from).",
    ["state"],
    registry=REGISTRY,
)
SUBMITTED = Counter(
    "mlmesh_review_items_submitted",
    "Items submitted, by source and outcome (created, duplicate).",
    ["source", "outcome"],
    registry=REGISTRY,
)
VERDICTS_RECORDED = Counter(
    "mlmesh_review_verdicts",
    "Verdicts recorded, by verdict and item source.",
    ["verdict", "source"],
    registry=REGISTRY,
)
RACES_LOST = Counter(
    "mlmesh_review_races_lost",
    "Changes that lost a race to a concurrent one (the caller got ABORTED), by operation.",
    ["operation"],
    registry=REGISTRY,
)
ESCALATIONS = Counter(
    "mlmesh_review_escalations",
    "Items escalated, by source.",
    ["source"],
    registry=REGISTRY,
)


def now_us() -> int:
    return time.time_ns() // 1000


def new_item_id(created_us: int) -> str:
    """Sortable by creation: 16 hex digits of the time, 8 random."""
    return f"{created_us:016x}{secrets.token_hex(4)}"


def item_name(item_id: str) -> str:
    return f"items/{item_id}"


def item_id_of(name: str) -> str:
    item_id = name.removeprefix("items/")
    if not _ITEM_ID.fullmatch(item_id):
        # The contract's pattern is wider than the ids this queue makes.
        raise NotFound("review item", name[:64])
    return item_id


@dataclass(frozen=True)
class Draft:
    """A new item, as a source sends it (already validated)."""

    source: str
    source_id: str
    model: str
    model_version: str = ""
    alternative_model: str = ""
    alternative_version: str = ""
    inputs: str = ""
    primary_output: str = ""
    alternative_output: str = ""
    context: dict[str, str] = field(default_factory=dict)
    request_id: str = ""


@dataclass(frozen=True)
class Filters:
    state: str = ""
    source: str = ""
    model: str = ""

    def query(self) -> dict[str, str]:
        """What a page token is bound to."""
        return {"state": self.state, "source": self.source, "model": self.model}


def effective_state(row: Any, now: int) -> str:
    """The state a reader sees: an expired claim is back where it came from."""
    if row.state == CLAIMED and row.claim_expire_us <= now:
        return ESCALATED if row.escalation_reason else OPEN
    return str(row.state)


# The columns whose length makes an item's size on the wire.
_TEXTS = (
    items.c.source_id,
    items.c.inputs,
    items.c.primary_output,
    items.c.alternative_output,
    items.c.context,
    items.c.request_id,
    items.c.correct_label,
    items.c.note,
    items.c.escalation_reason,
)


def _live_claim_by_other(me: str, now: int) -> sa.ColumnElement[bool]:
    return sa.and_(
        items.c.state == CLAIMED, items.c.claim_holder != me, items.c.claim_expire_us > now
    )


def _changeable_by(me: str, now: int) -> sa.ColumnElement[bool]:
    """Rows ``me`` may claim, decide or escalate: not DECIDED, and no live
    claim by anyone else."""
    return sa.and_(items.c.state != DECIDED, sa.not_(_live_claim_by_other(me, now)))


def _state_clause(state: str, now: int) -> sa.ColumnElement[bool]:
    expired = sa.and_(items.c.state == CLAIMED, items.c.claim_expire_us <= now)
    if state == OPEN:
        return sa.or_(items.c.state == OPEN, sa.and_(expired, items.c.escalation_reason == ""))
    if state == ESCALATED:
        return sa.or_(items.c.state == ESCALATED, sa.and_(expired, items.c.escalation_reason != ""))
    if state == CLAIMED:
        return sa.and_(items.c.state == CLAIMED, items.c.claim_expire_us > now)
    return items.c.state == state


def decode_token(token: str, filters: Filters) -> str:
    """The item id a page token continues after (the chassis' key token,
    bound to the filters)."""
    after = decode_page_token(token, filters.query())
    if not isinstance(after, str) or not _ITEM_ID.fullmatch(after):
        raise InvalidArgument.field("page_token", "is not a token this list returned")
    return after


class ReviewQueue:
    def __init__(
        self,
        database: Database,
        max_open_items: int = 100_000,
        max_open_reports_per_key: int = 100,
    ) -> None:
        self.db = database
        self.max_open_items = max_open_items
        self.max_open_reports_per_key = max_open_reports_per_key
        # The latest counts by effective state (refresh_stats).
        self.depth: dict[str, int] = dict.fromkeys(STATES, 0)

    # ---- reads ----------------------------------------------------------------

    async def get(self, item_id: str) -> Any:
        async with self.db.read() as c:
            row = (await c.execute(sa.select(items).where(items.c.id == item_id))).first()
        if row is None:
            raise NotFound("review item", item_name(item_id))
        return row

    async def page(
        self, filters: Filters, page_size: int, page_token: str
    ) -> tuple[list[Any], str]:
        if page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        chars = sum((sa.func.length(column) for column in _TEXTS), sa.literal(0))
        query = sa.select(items.c.id, chars.label("chars")).order_by(items.c.id).limit(size + 1)
        if page_token:
            query = query.where(items.c.id > decode_token(page_token, filters))
        if filters.state:
            query = query.where(_state_clause(filters.state, now_us()))
        if filters.source:
            query = query.where(items.c.source == filters.source)
        if filters.model:
            query = query.where(items.c.model == filters.model)
        async with self.db.read() as c:
            # The ids and sizes first; whole rows only for the page.
            heads = list((await c.execute(query)).all())
            chosen: list[str] = []
            total = 0
            for head in heads[:size]:
                if chosen and total + int(head.chars or 0) > PAGE_CHARS:
                    break
                chosen.append(head.id)
                total += int(head.chars or 0)
            rows = []
            if chosen:
                found = await c.execute(
                    sa.select(items).where(items.c.id.in_(chosen)).order_by(items.c.id)
                )
                rows = list(found.all())
        if len(heads) > len(chosen):
            return rows, encode_page_token(chosen[-1], filters.query())
        return rows, ""

    async def decided(
        self,
        model: str,
        sources: Sequence[str],
        decided_after_us: int,
        limit: int,
        after: tuple[int, str] | None = None,
    ) -> list[Any]:
        """A page of a model's DECIDED items, the oldest decided first, from
        after ``after`` (the previous page's last (decide_us, id))."""
        query = (
            sa.select(items)
            .where(items.c.model == model, items.c.state == DECIDED)
            .order_by(items.c.decide_us, items.c.id)
            .limit(limit)
        )
        if sources:
            query = query.where(items.c.source.in_(list(sources)))
        if decided_after_us:
            query = query.where(items.c.decide_us >= decided_after_us)
        if after is not None:
            query = query.where(
                sa.or_(
                    items.c.decide_us > after[0],
                    sa.and_(items.c.decide_us == after[0], items.c.id > after[1]),
                )
            )
        async with self.db.read() as c:
            return list((await c.execute(query)).all())

    async def decided_pages(
        self,
        model: str,
        sources: Sequence[str],
        decided_after_us: int,
        limit: int,
        page_size: int = 100,
    ) -> AsyncIterator[list[Any]]:
        """At most ``limit`` DECIDED items in pages (bounded memory)."""
        after: tuple[int, str] | None = None
        left = limit
        while left > 0:
            size = min(left, page_size)
            rows = await self.decided(model, sources, decided_after_us, size, after)
            if rows:
                yield rows
            if len(rows) < size:
                return
            left -= len(rows)
            after = (rows[-1].decide_us, rows[-1].id)

    async def refresh_stats(self) -> None:
        now = now_us()
        expired = sa.and_(items.c.state == CLAIMED, items.c.claim_expire_us <= now)
        query = sa.select(
            items.c.state,
            expired.label("expired"),
            (items.c.escalation_reason != "").label("escalated"),
            sa.func.count(),
        ).group_by(sa.text("1"), sa.text("2"), sa.text("3"))
        async with self.db.read() as c:
            rows = (await c.execute(query)).all()
        depth = dict.fromkeys(STATES, 0)
        for state, is_expired, escalated, count in rows:
            if state == CLAIMED and is_expired:
                state = ESCALATED if escalated else OPEN
            depth[state] = depth.get(state, 0) + int(count)
        self.depth = depth
        for state, count in depth.items():
            QUEUE_DEPTH.labels(state).set(count)

    async def refresh_stats_forever(self, every_s: float) -> None:
        while True:
            try:
                await self.refresh_stats()
            except Exception as error:  # the gauges go stale; the service goes on
                log.warning("review queue stats failed: %s", error)
            await asyncio.sleep(every_s)

    # ---- writes ---------------------------------------------------------------

    async def check_reporter(self, submitter: str) -> None:
        """Refuses a new user report while ``submitter`` has as many
        undecided ones as it may: one key cannot fill the queue."""
        query = (
            sa.select(sa.func.count())
            .select_from(items)
            .where(items.c.submitter == submitter, items.c.state != DECIDED)
            .where(items.c.source == "USER_REPORT")
        )
        async with self.db.read() as c:
            waiting = int((await c.execute(query)).scalar_one())
        if waiting >= self.max_open_reports_per_key:
            raise ResourceExhausted(
                f"this key has {waiting} reports waiting for review (at most "
                f"{self.max_open_reports_per_key}); retry once some are decided",
                [QuotaViolation(f"key:{submitter}", "undecided reports at the maximum")],
                retry_after_s=600.0,
                undecided_reports=waiting,
            )

    async def submit(self, drafts: Sequence[Draft], submitter: str) -> tuple[list[Any], int]:
        """Queues ``drafts`` (a source and source id already queued is
        returned as it is); (the items in request order, how many are new)."""
        if self.depth.get(OPEN, 0) >= self.max_open_items:
            raise ResourceExhausted(
                f"the review queue holds {self.depth[OPEN]} open items (at most "
                f"{self.max_open_items}); retry later",
                [QuotaViolation("review-queue", "open items at the maximum")],
                retry_after_s=60.0,
                open_items=self.depth[OPEN],
                max_open_items=self.max_open_items,
            )
        keys = list(dict.fromkeys((d.source, d.source_id) for d in drafts))
        for attempt in range(2):
            try:
                rows, created = await self._insert_missing(drafts, keys, submitter)
                break
            except exc.IntegrityError:
                # Another writer (a replica on a shared PostgreSQL without
                # the write lock) inserted one first: read again.
                if attempt:
                    raise
        by_key = {(r.source, r.source_id): r for r in rows}
        for source, source_id in keys:
            outcome = "created" if (source, source_id) in created else "duplicate"
            SUBMITTED.labels(source, outcome).inc()
        self.depth[OPEN] = self.depth.get(OPEN, 0) + len(created)
        return [by_key[(d.source, d.source_id)] for d in drafts], len(created)

    async def _insert_missing(
        self, drafts: Sequence[Draft], keys: list[tuple[str, str]], submitter: str
    ) -> tuple[list[Any], set[tuple[str, str]]]:
        match = sa.or_(*(sa.and_(items.c.source == s, items.c.source_id == i) for s, i in keys))
        async with self.db.write() as c:
            present = {
                (r.source, r.source_id)
                for r in (
                    await c.execute(sa.select(items.c.source, items.c.source_id).where(match))
                )
            }
            created: set[tuple[str, str]] = set()
            rows: list[dict[str, Any]] = []
            for draft in drafts:
                key = (draft.source, draft.source_id)
                if key in present or key in created:
                    continue
                created.add(key)
                stamp = now_us()
                rows.append(
                    {
                        "id": new_item_id(stamp),
                        "source": draft.source,
                        "source_id": draft.source_id,
                        "model": draft.model,
                        "model_version": draft.model_version,
                        "alternative_model": draft.alternative_model,
                        "alternative_version": draft.alternative_version,
                        "inputs": draft.inputs,
                        "primary_output": draft.primary_output,
                        "alternative_output": draft.alternative_output,
                        "context": json.dumps(draft.context, sort_keys=True),
                        "request_id": draft.request_id,
                        "submitter": submitter,
                        "state": OPEN,
                        "claim_holder": "",
                        "claim_expire_us": 0,
                        "verdict": "",
                        "correct_label": "",
                        "note": "",
                        "reviewer": "",
                        "decide_us": 0,
                        "escalation_reason": "",
                        "create_us": stamp,
                        "update_us": stamp,
                    }
                )
            if rows:
                await c.execute(items.insert(), rows)
            found = list((await c.execute(sa.select(items).where(match))).all())
        return found, created

    async def claim(self, item_id: str, me: str, lease_s: float) -> Any:
        now = now_us()
        row = await self.get(item_id)
        self._check_changeable(row, me, now, "claim")
        values = {
            "state": CLAIMED,
            "claim_holder": me,
            "claim_expire_us": now + int(lease_s * 1_000_000),
            "update_us": now,
        }
        return await self._change(item_id, me, now, values, "claim")

    async def decide(
        self, item_id: str, me: str, verdict: str, correct_label: str, note: str
    ) -> Any:
        now = now_us()
        row = await self.get(item_id)
        if (
            row.state == DECIDED
            and row.reviewer == me
            and (row.verdict, row.correct_label, row.note) == (verdict, correct_label, note)
        ):
            return row  # the winner's retry
        self._check_changeable(row, me, now, "verdict")
        values = {
            "state": DECIDED,
            "claim_holder": "",
            "claim_expire_us": 0,
            "verdict": verdict,
            "correct_label": correct_label,
            "note": note,
            "reviewer": me,
            "decide_us": now,
            "update_us": now,
        }
        decided = await self._change(item_id, me, now, values, "verdict")
        VERDICTS_RECORDED.labels(verdict, decided.source).inc()
        return decided

    async def escalate(self, item_id: str, me: str, reason: str) -> Any:
        now = now_us()
        row = await self.get(item_id)
        self._check_changeable(row, me, now, "escalate")
        values = {
            "state": ESCALATED,
            "claim_holder": "",
            "claim_expire_us": 0,
            "escalation_reason": reason,
            "update_us": now,
        }
        escalated = await self._change(item_id, me, now, values, "escalate")
        ESCALATIONS.labels(escalated.source).inc()
        return escalated

    def _check_changeable(self, row: Any, me: str, now: int, operation: str) -> None:
        name = item_name(row.id)
        if row.state == DECIDED:
            raise FailedPrecondition(
                f"review item {name} is already DECIDED by {row.reviewer}: no {operation}",
                name=name,
                state=DECIDED,
                reviewer_key_id=row.reviewer,
                operation=operation,
            )
        if row.state == CLAIMED and row.claim_holder != me and row.claim_expire_us > now:
            expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.claim_expire_us / 1e6))
            raise FailedPrecondition(
                f"review item {name} is CLAIMED by {row.claim_holder} until {expires}: "
                f"no {operation}",
                name=name,
                state=CLAIMED,
                claim_holder=row.claim_holder,
                claim_expire_time=expires,
                operation=operation,
            )

    async def _change(
        self, item_id: str, me: str, now: int, values: dict[str, Any], operation: str
    ) -> Any:
        async with self.db.write() as c:
            result = await c.execute(
                items.update()
                .where(items.c.id == item_id, _changeable_by(me, now))
                .values(**values)
            )
            row = (await c.execute(sa.select(items).where(items.c.id == item_id))).first()
        if result.rowcount != 1 or row is None:
            RACES_LOST.labels(operation).inc()
            name = item_name(item_id)
            state = "" if row is None else effective_state(row, now)
            raise Aborted(
                f"review item {name} was changed by a concurrent call (now {state}): read it again",
                name=name,
                state=state,
                operation=operation,
            )
        return row

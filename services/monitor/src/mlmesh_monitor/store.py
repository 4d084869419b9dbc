"""The monitor's rows: predictions (idempotent by request id), their
feedback, drift references and the unknown-feedback count. No grpc here."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa
from mlmesh.monitor.v1 import monitor_pb2 as pb
from mlmesh_chassis.database import Database

from mlmesh_monitor.db import counters, predictions, references

UNKNOWN_FEEDBACK = "unknown_feedback"
# Unknown ids a feedback response lists (the rest are only counted).
LISTED_UNKNOWN = 20
# IN (...) lists are cut to this many parameters (SQLite's default limit
# is far above; PostgreSQL's is 65535).
CHUNK = 500
# Rows read per query of a long read (the event loop runs between pages).
PAGE = 5000


def utc(value: dt.datetime) -> dt.datetime:
    """A stored time as an aware UTC datetime (SQLite hands back naive ones)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def floats(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


@dataclass
class FeedbackOutcome:
    recorded: int = 0
    unchanged: int = 0
    updated: int = 0
    unknown: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class QualityRow:
    version: int
    time: dt.datetime
    latency_ms: float
    status: str
    predicted_label: str
    label: str | None


class MonitorStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    # ---- writes ---------------------------------------------------------------

    async def log(self, batch: Sequence[pb.Prediction]) -> tuple[list[pb.Prediction], int]:
        """Stores the predictions not stored yet (one transaction); returns
        those stored now and the number of duplicates."""
        now = dt.datetime.now(dt.UTC)
        ids = [p.request_id for p in batch]
        async with self.database.write() as conn:
            known = await _existing(conn, ids)
            fresh = [p for p in batch if p.request_id not in known]
            if fresh:
                await conn.execute(predictions.insert(), [_row(p, now) for p in fresh])
        return fresh, len(batch) - len(fresh)

    async def feedback(
        self,
        items: Sequence[pb.Feedback],
        allowed: Callable[[str], bool] = lambda model: True,
    ) -> FeedbackOutcome:
        """Joins labels to logged predictions (one transaction): first label,
        same label (nothing changes), or a different one (replaced). A
        prediction of a model ``allowed`` refuses is left alone and counted
        as unknown, like an id never logged (its existence is not told)."""
        outcome = FeedbackOutcome()
        now = dt.datetime.now(dt.UTC)
        async with self.database.write() as conn:
            ids = [item.request_id for item in items]
            labels: dict[str, str | None] = {}
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                result = await conn.execute(
                    sa.select(
                        predictions.c.request_id, predictions.c.model, predictions.c.label
                    ).where(predictions.c.request_id.in_(chunk))
                )
                labels.update({row.request_id: row.label for row in result if allowed(row.model)})
            for item in items:
                if item.request_id not in labels:
                    outcome.unknown.append(item.request_id)
                    continue
                before = labels[item.request_id]
                if before == item.label:
                    outcome.unchanged += 1
                    continue
                if before is None:
                    outcome.recorded += 1
                else:
                    outcome.updated += 1
                await conn.execute(
                    predictions.update()
                    .where(predictions.c.request_id == item.request_id)
                    .values(label=item.label, label_time=now)
                )
            if outcome.unknown:
                await _add_counter(conn, UNKNOWN_FEEDBACK, len(outcome.unknown))
        return outcome

    async def set_reference(self, reference: pb.DriftReference) -> pb.DriftReference:
        stored = pb.DriftReference()
        stored.CopyFrom(reference)
        now = dt.datetime.now(dt.UTC)
        stored.update_time.FromDatetime(now)
        async with self.database.write() as conn:
            await conn.execute(
                references.delete().where(
                    (references.c.model == stored.model) & (references.c.version == stored.version)
                )
            )
            await conn.execute(
                references.insert().values(
                    model=stored.model,
                    version=stored.version,
                    body=stored.SerializeToString(),
                    update_time=now,
                )
            )
        return stored

    async def prune(self, before: dt.datetime) -> int:
        async with self.database.write() as conn:
            result = await conn.execute(predictions.delete().where(predictions.c.time < before))
        return int(result.rowcount or 0)

    # ---- reads ----------------------------------------------------------------

    async def reference(self, model: str, version: int) -> pb.DriftReference | None:
        """The version's own reference, else the model's default (version 0)."""
        async with self.database.read() as conn:
            result = await conn.execute(
                sa.select(references.c.version, references.c.body).where(
                    (references.c.model == model) & references.c.version.in_([version, 0])
                )
            )
            bodies = {row.version: row.body for row in result}
        body = bodies.get(version, bodies.get(0))
        return None if body is None else pb.DriftReference.FromString(body)

    async def has_reference(self, model: str, version: int) -> bool:
        async with self.database.read() as conn:
            found = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(references)
                .where((references.c.model == model) & (references.c.version == version))
            )
        return bool(found)

    async def unknown_feedback(self) -> int:
        async with self.database.read() as conn:
            value = await conn.scalar(
                sa.select(counters.c.value).where(counters.c.name == UNKNOWN_FEEDBACK)
            )
        return int(value or 0)

    async def quality_rows(
        self, model: str, version: int, start: dt.datetime, end: dt.datetime, limit: int
    ) -> list[QualityRow]:
        """A window's newest predictions (at most ``limit``), of one version or all."""
        where = (
            (predictions.c.model == model)
            & (predictions.c.time >= start)
            & (predictions.c.time < end)
        )
        if version:
            where = where & (predictions.c.version == version)
        columns = (
            predictions.c.version,
            predictions.c.latency_ms,
            predictions.c.status,
            predictions.c.predicted_label,
            predictions.c.label,
        )
        rows = await self._newest(columns, where, limit)
        # Up to quality_max_rows objects: made in a worker thread.
        return await asyncio.to_thread(_quality_rows, rows)

    async def feature_rows(
        self,
        model: str,
        version: int,
        start: dt.datetime,
        end: dt.datetime,
        limit: int,
        width: int = 4096,
    ) -> list[bytes]:
        """A version's newest logged feature vectors in a window (at most
        ``limit``), each cut to its first ``width`` features in the
        database: a read holds limit x width floats, never the whole
        vectors (up to 4096 each) when the reference needs fewer."""
        where = (
            (predictions.c.model == model)
            & (predictions.c.version == version)
            & (predictions.c.time >= start)
            & (predictions.c.time < end)
            & (predictions.c.status == "OK")
            & (sa.func.length(predictions.c.features) > 0)
        )
        # substr over a BLOB (SQLite) or bytea (PostgreSQL) counts bytes.
        head = sa.func.substr(predictions.c.features, 1, 4 * width, type_=sa.LargeBinary)
        return [
            bytes(r.features) for r in await self._newest((head.label("features"),), where, limit)
        ]

    async def _newest(
        self, columns: Sequence[sa.ColumnElement[Any]], where: Any, limit: int
    ) -> list[Any]:
        """Rows matching ``where``, newest first, at most ``limit``: read a
        page at a time (keyset on time, request id), yielding to the event
        loop between pages (SQLite reads run on the loop itself)."""
        rows: list[Any] = []
        after: tuple[dt.datetime, str] | None = None
        while len(rows) < limit:
            query = sa.select(predictions.c.time, predictions.c.request_id, *columns).where(where)
            if after is not None:
                time_, request_id = after
                query = query.where(
                    (predictions.c.time < time_)
                    | ((predictions.c.time == time_) & (predictions.c.request_id < request_id))
                )
            query = query.order_by(
                predictions.c.time.desc(), predictions.c.request_id.desc()
            ).limit(min(PAGE, limit - len(rows)))
            async with self.database.read() as conn:
                page = list(await conn.execute(query))
            rows.extend(page)
            if len(page) < PAGE:
                break
            after = (page[-1].time, page[-1].request_id)
            await asyncio.sleep(0)
        return rows

    async def recent_versions(self, since: dt.datetime, limit: int = 200) -> list[tuple[str, int]]:
        """(model, version) pairs with predictions since ``since``."""
        query = (
            sa.select(predictions.c.model, predictions.c.version)
            .where(predictions.c.time >= since)
            .group_by(predictions.c.model, predictions.c.version)
            .order_by(predictions.c.model, predictions.c.version)
            .limit(limit)
        )
        async with self.database.read() as conn:
            result = await conn.execute(query)
            return [(r.model, int(r.version)) for r in result]

    async def low_confidence(
        self,
        model: str,
        since: dt.datetime,
        threshold: float,
        limit: int,
        skip: Collection[str] = (),
    ) -> tuple[int, int, list[pb.Prediction]]:
        """A model's classifier predictions since ``since`` (answered, with a
        label): how many, how many under ``threshold``, and the newest of
        those whose request id is not in ``skip`` (at most ``limit``). Only
        ids are read to pass over ``skip``; whole rows (features up to 16 KiB
        each) only for the ``limit`` returned, made in a worker thread."""
        base = (
            (predictions.c.model == model)
            & (predictions.c.time >= since)
            & (predictions.c.predicted_label != "")
            & (predictions.c.status == "OK")
        )
        low = base & (predictions.c.confidence < threshold)
        count = sa.select(sa.func.count()).select_from(predictions)
        newest = (predictions.c.time.desc(), predictions.c.request_id.desc())
        async with self.database.read() as conn:
            total = int(await conn.scalar(count.where(base)) or 0)
            under = int(await conn.scalar(count.where(low)) or 0)
            ids = await conn.execute(
                sa.select(predictions.c.request_id)
                .where(low)
                .order_by(*newest)
                .limit(limit + len(skip))
            )
            fresh = [r.request_id for r in ids if r.request_id not in skip][:limit]
            result = await conn.execute(
                sa.select(predictions).where(predictions.c.request_id.in_(fresh)).order_by(*newest)
            )
            raw = list(result)
        rows = await asyncio.to_thread(lambda: [_message(r) for r in raw])
        return total, under, rows


def _quality_rows(rows: Sequence[Any]) -> list[QualityRow]:
    return [
        QualityRow(
            int(r.version),
            utc(r.time),
            float(r.latency_ms),
            r.status,
            r.predicted_label,
            r.label,
        )
        for r in rows
    ]


async def _existing(conn, ids: list[str]) -> set[str]:  # type: ignore[no-untyped-def]
    known: set[str] = set()
    for start in range(0, len(ids), CHUNK):
        result = await conn.execute(
            sa.select(predictions.c.request_id).where(
                predictions.c.request_id.in_(ids[start : start + CHUNK])
            )
        )
        known.update(row.request_id for row in result)
    return known


async def _add_counter(conn, name: str, amount: int) -> None:  # type: ignore[no-untyped-def]
    updated = await conn.execute(
        counters.update().where(counters.c.name == name).values(value=counters.c.value + amount)
    )
    if not updated.rowcount:
        await conn.execute(counters.insert().values(name=name, value=amount))


def _row(p: pb.Prediction, now: dt.datetime) -> dict[str, object]:
    return {
        "request_id": p.request_id,
        "kind": int(p.kind),
        "model": p.model,
        "version": int(p.version),
        "key_id": p.key_id,
        "input_sha256": p.input_sha256,
        "features": np.asarray(p.features, dtype="<f4").tobytes(),
        "scores": np.asarray(p.scores, dtype="<f4").tobytes(),
        "output_text": p.output_text,
        "predicted_label": p.predicted_label,
        "confidence": float(p.confidence),
        "latency_ms": p.latency.ToTimedelta().total_seconds() * 1000.0,
        "status": p.status,
        "time": p.time.ToDatetime(tzinfo=dt.UTC),
        "logged_time": now,
        "label": None,
        "label_time": None,
    }


def _message(r) -> pb.Prediction:  # type: ignore[no-untyped-def]
    p = pb.Prediction(
        request_id=r.request_id,
        kind=r.kind,
        model=r.model,
        version=int(r.version),
        key_id=r.key_id,
        input_sha256=r.input_sha256,
        features=floats(r.features).tolist(),
        scores=floats(r.scores).tolist(),
        output_text=r.output_text,
        predicted_label=r.predicted_label,
        confidence=float(r.confidence),
        status=r.status,
    )
    p.latency.FromTimedelta(dt.timedelta(milliseconds=float(r.latency_ms)))
    p.time.FromDatetime(utc(r.time))
    return p

"""The event log: every alias and experiment change, in commit order, read
from any sequence number on and then live."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterable

import sqlalchemy as sa
from mlmesh.registry.v1 import model_pb2 as pb

from mlmesh_registry import db
from mlmesh_registry.store.base import StoreBase

# Events read per query while a watcher catches up.
_BATCH = 500


class EventLog(StoreBase):
    async def watch(
        self, models: Iterable[str], after: int, poll_seconds: float
    ) -> AsyncGenerator[pb.AliasEvent | pb.ExperimentEvent, None]:
        """Yields the events after sequence ``after`` (of ``models``, or of
        every model where none is named), then each new one, forever. A write
        of this process wakes it at once; other replicas' writes are seen
        within ``poll_seconds``."""
        models = list(models)
        e = db.events
        while True:
            stmt = (
                sa.select(e.c.sequence, e.c.kind, e.c.body)
                .where(e.c.sequence > after)
                .order_by(e.c.sequence)
                .limit(_BATCH)
            )
            if models:
                stmt = stmt.where(e.c.model.in_(models))
            async with self.read() as c:
                rows = list((await c.execute(stmt)).all())
            for row in rows:
                after = row.sequence
                yield _event(row.kind, row.body)
            if not rows:
                async with self.changes:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changes.wait(), poll_seconds)


def _event(kind: str, body: bytes) -> pb.AliasEvent | pb.ExperimentEvent:
    if kind == "alias":
        return pb.AliasEvent.FromString(body)
    return pb.ExperimentEvent.FromString(body)

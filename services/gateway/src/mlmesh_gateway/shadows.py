"""Shadow traffic (A/B experiments' mirrored requests): run off the
callers' path, compared with the primary's answer, recorded for review."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np
import sqlalchemy as sa
from mlmesh.registry.v1 import model_pb2
from mlmesh_chassis.context import deadline_var
from mlmesh_chassis.database import Database
from sqlalchemy import exc

log = logging.getLogger("mlmesh.gateway")
# Shadow answers farther than this (max absolute difference) from the primary's
# are recorded as disagreeing.
SHADOW_TOLERANCE = 1e-3
# Each shadow's own deadline (the caller's call has ended by then).
SHADOW_TIMEOUT_S = 60.0

metadata = sa.MetaData()
shadow_results = sa.Table(
    "shadow_results",
    metadata,
    # The primary call's server-made call id (a caller's request id could be
    # reused, and would make the second comparison vanish).
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("experiment", sa.String(63), nullable=False),
    sa.Column("model", sa.String(63), nullable=False),
    sa.Column("primary_version", sa.BigInteger, nullable=False),
    sa.Column("shadow_version", sa.BigInteger, nullable=False),
    sa.Column("max_abs_diff", sa.Float, nullable=False),
    sa.Column("agreed", sa.Boolean, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)


class ShadowLog:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def record(
        self,
        call_id: str,
        experiment: str,
        model: str,
        primary_version: int,
        shadow_version: int,
        max_abs_diff: float,
        agreed: bool,
    ) -> None:
        """One shadow comparison (where primary and shadow answers disagree
        beyond the tolerance, ``agreed`` is False)."""
        try:
            async with self.db.write() as c:
                await c.execute(
                    shadow_results.insert().values(
                        request_id=call_id,
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


class ShadowRunner:
    """Mirrors requests to shadow versions, at most ``limit`` at once: when
    that many run, a new one is dropped (shadows are best effort and never
    queue); a failing shadow is logged and never reaches the caller."""

    def __init__(self, shadows: ShadowLog | None, limit: int = 16) -> None:
        self.shadows = shadows
        self._running = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(
        self,
        call_id: str,
        experiment: model_pb2.Experiment,
        model: str,
        versions: tuple[int, int],
        difference: Callable[[], Awaitable[float]],
    ) -> None:
        """Runs ``difference()`` (the shadow's answer against the primary's:
        the max absolute difference) for ``versions`` (primary, shadow) and
        records it under the primary's ``call_id``."""
        shadows = self.shadows
        if shadows is None or self._running.locked():
            return

        async def run() -> None:
            async with self._running:
                deadline_var.set(time.monotonic() + SHADOW_TIMEOUT_S)
                try:
                    diff = await difference()
                    await shadows.record(
                        call_id, experiment.name, model, *versions, diff, diff <= SHADOW_TOLERANCE
                    )
                except Exception as error:  # a shadow never affects the caller
                    log.warning("shadow of %s failed: %s", call_id, error)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def max_abs_difference(primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray]) -> float:
    """How far the shadow's outputs are from the primary's (every output)."""
    return max(
        float(np.max(np.abs(primary[n].astype(np.float64) - shadow[n].astype(np.float64))))
        for n in primary
    )

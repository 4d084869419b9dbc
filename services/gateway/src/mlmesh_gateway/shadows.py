"""Shadow comparisons (A/B experiments' mirrored traffic), for later review."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from mlmesh_chassis.database import Database
from sqlalchemy import exc

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

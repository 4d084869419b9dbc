"""The batch service's table and its database (see mlmesh_chassis.database):
SQLite under the service's root by default, PostgreSQL by one setting."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from mlmesh_chassis.database import Database

metadata = sa.MetaData()

jobs = sa.Table(
    "batch_jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    # The key that created it: the only one that sees it, and the one billed.
    sa.Column("owner", sa.String(64), nullable=False),
    # "<owner>:<request_id>", or "job:<id>" without one: unique.
    sa.Column("idempotency", sa.String(140), nullable=False, unique=True),
    # sha256 of the request, to tell a retry from another job under one id.
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("display_name", sa.String(100), nullable=False),
    # The Job message as accepted (serialized mlmesh.batch.v1.Job).
    sa.Column("spec", sa.LargeBinary, nullable=False),
    # The plan the driver runs (JSON, plan.JobPlan).
    sa.Column("plan", sa.Text, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    # The latest progress (JSON: driver.Status fields).
    sa.Column("progress", sa.Text, nullable=False),
    # Why it failed or was cancelled (JSON: code, reason, message).
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("resumed_from", sa.String(40), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("driver_pid", sa.Integer, nullable=False),
    # The last output part billed (parts are billed once each, in order).
    sa.Column("billed_through", sa.Integer, nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_batch_jobs_owner_created", "owner", "create_time"),
    sa.Index("ix_batch_jobs_state", "state"),
)


def batch_database(url: str, connect_timeout: float = 2.0) -> Database:
    return Database(
        url,
        name="batch",
        migrations=Path(__file__).parent / "migrations",
        version_table="alembic_version_batch",
        connect_timeout=connect_timeout,
    )

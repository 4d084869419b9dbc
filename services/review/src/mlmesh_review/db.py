"""The review queue's table and its database (see mlmesh_chassis.database):
SQLite under the service's root by default, PostgreSQL by one setting.

Times are integer microseconds since the epoch (the same on both engines).
An item's id starts with its creation time in hex, so ordering by id is
ordering by age (the list's order and its page token)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from mlmesh_chassis.database import Database

metadata = sa.MetaData()

items = sa.Table(
    "review_items",
    metadata,
    # 16 hex digits of the creation time (µs) and 8 random ones.
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("source_id", sa.String(200), nullable=False),
    sa.Column("model", sa.String(63), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("alternative_model", sa.String(63), nullable=False),
    sa.Column("alternative_version", sa.String(64), nullable=False),
    sa.Column("inputs", sa.Text, nullable=False),
    sa.Column("primary_output", sa.Text, nullable=False),
    sa.Column("alternative_output", sa.Text, nullable=False),
    # JSON object of strings.
    sa.Column("context", sa.Text, nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("submitter", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("claim_holder", sa.String(64), nullable=False),
    sa.Column("claim_expire_us", sa.BigInteger, nullable=False),
    sa.Column("verdict", sa.String(32), nullable=False),
    sa.Column("correct_label", sa.Text, nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("reviewer", sa.String(64), nullable=False),
    sa.Column("decide_us", sa.BigInteger, nullable=False),
    sa.Column("escalation_reason", sa.Text, nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
    sa.Column("update_us", sa.BigInteger, nullable=False),
    # Idempotent submission: one item per source and source id.
    sa.UniqueConstraint("source", "source_id", name="uq_review_items_source"),
    sa.Index("ix_review_items_state", "state", "id"),
    sa.Index("ix_review_items_model_state", "model", "state", "decide_us"),
    # A reporter's undecided reports are counted on every ReportPrediction.
    sa.Index("ix_review_items_submitter_state", "submitter", "state"),
)


def review_database(url: str, connect_timeout: float = 2.0) -> Database:
    return Database(
        url,
        name="review",
        migrations=Path(__file__).parent / "migrations",
        version_table="alembic_version_review",
        connect_timeout=connect_timeout,
    )

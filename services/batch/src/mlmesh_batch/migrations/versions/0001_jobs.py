"""The batch jobs table.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "batch_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("idempotency", sa.String(140), nullable=False, unique=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("display_name", sa.String(100), nullable=False),
        sa.Column("spec", sa.LargeBinary, nullable=False),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("progress", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("resumed_from", sa.String(40), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("driver_pid", sa.Integer, nullable=False),
        sa.Column("billed_through", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("create_time", ts, nullable=False),
        sa.Column("start_time", ts, nullable=True),
        sa.Column("end_time", ts, nullable=True),
        sa.Column("update_time", ts, nullable=False),
    )
    op.create_index("ix_batch_jobs_owner_created", "batch_jobs", ["owner", "create_time"])
    op.create_index("ix_batch_jobs_state", "batch_jobs", ["state"])

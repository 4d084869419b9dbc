"""The monitor's tables: predictions (with feedback), drift references, counters.

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
        "monitor_predictions",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.SmallInteger, nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("features", sa.LargeBinary, nullable=False),
        sa.Column("scores", sa.LargeBinary, nullable=False),
        sa.Column("output_text", sa.Text, nullable=False),
        sa.Column("predicted_label", sa.String(64), nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("time", ts, nullable=False),
        sa.Column("logged_time", ts, nullable=False),
        sa.Column("label", sa.String(64), nullable=True),
        sa.Column("label_time", ts, nullable=True),
    )
    op.create_index("ix_monitor_predictions_model_time", "monitor_predictions", ["model", "time"])
    op.create_index(
        "ix_monitor_predictions_model_version_time",
        "monitor_predictions",
        ["model", "version", "time"],
    )
    op.create_table(
        "monitor_drift_references",
        sa.Column("model", sa.String(63), primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("update_time", ts, nullable=False),
    )
    op.create_table(
        "monitor_counters",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )

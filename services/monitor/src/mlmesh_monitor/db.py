"""The monitor's tables and its database (see mlmesh_chassis.database):
SQLite under the service's root by default, PostgreSQL by one setting."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from mlmesh_chassis.database import Database

metadata = sa.MetaData()
ts = sa.DateTime(timezone=True)

predictions = sa.Table(
    "monitor_predictions",
    metadata,
    # The gateway's call id: one row per call, whoever logs it twice.
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.SmallInteger, nullable=False),
    sa.Column("model", sa.String(63), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("key_id", sa.String(16), nullable=False),
    sa.Column("input_sha256", sa.String(64), nullable=False),
    # float32 little-endian arrays (numpy.frombuffer).
    sa.Column("features", sa.LargeBinary, nullable=False),
    sa.Column("scores", sa.LargeBinary, nullable=False),
    sa.Column("output_text", sa.Text, nullable=False),
    sa.Column("predicted_label", sa.String(64), nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("time", ts, nullable=False),
    sa.Column("logged_time", ts, nullable=False),
    # Ground truth, once RecordFeedback gives it.
    sa.Column("label", sa.String(64), nullable=True),
    sa.Column("label_time", ts, nullable=True),
    sa.Index("ix_monitor_predictions_model_time", "model", "time"),
    sa.Index("ix_monitor_predictions_model_version_time", "model", "version", "time"),
)

references = sa.Table(
    "monitor_drift_references",
    metadata,
    sa.Column("model", sa.String(63), primary_key=True),
    # 0: the model's default reference.
    sa.Column("version", sa.BigInteger, primary_key=True),
    # The DriftReference message as stored (thresholds defaulted).
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("update_time", ts, nullable=False),
)

counters = sa.Table(
    "monitor_counters",
    metadata,
    # "unknown_feedback": feedback for request ids never logged.
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)


def monitor_database(url: str, connect_timeout: float = 2.0) -> Database:
    return Database(
        url,
        name="monitor",
        migrations=Path(__file__).parent / "migrations",
        version_table="alembic_version_monitor",
        connect_timeout=connect_timeout,
    )

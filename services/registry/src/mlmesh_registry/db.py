"""The registry's tables and its database (see mlmesh_chassis.database).

Writes that append to the event log are serialized, so event sequence
numbers commit in order and a watcher never skips one.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from mlmesh_chassis.database import Database

metadata = sa.MetaData()
_EVENT_LOCK_KEY = 0x6D6C6D  # any constant shared by every registry replica

models = sa.Table(
    "models",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("latest_version", sa.BigInteger, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)
model_tags = sa.Table(
    "model_tags",
    metadata,
    sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("key", sa.String(63), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)
versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("format", sa.String(63), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("artifact_path", sa.Text, nullable=False),
    sa.Column("lineage", sa.LargeBinary, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)
version_tags = sa.Table(
    "version_tags",
    metadata,
    sa.Column("model", sa.String(63), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("key", sa.String(63), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
    sa.ForeignKeyConstraint(
        ["model", "version"], ["model_versions.model", "model_versions.version"]
    ),
)
aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("alias", sa.String(63), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)
experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),  # serialized Experiment
)
# Append-only: alias and experiment changes, in commit order.
events = sa.Table(
    "events",
    metadata,
    sa.Column(
        "sequence",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("model", sa.String(63), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),  # "alias" | "experiment"
    sa.Column("subject", sa.String(63), nullable=False),  # alias or experiment name
    sa.Column("body", sa.LargeBinary, nullable=False),  # serialized AliasEvent/ExperimentEvent
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)


def registry_database(url: str, connect_timeout: float = 2.0) -> Database:
    return Database(
        url,
        name="registry",
        migrations=Path(__file__).parent / "migrations",
        connect_timeout=connect_timeout,
        write_lock_key=_EVENT_LOCK_KEY,
    )

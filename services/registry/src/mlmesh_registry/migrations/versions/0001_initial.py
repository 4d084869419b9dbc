"""Initial registry schema.

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
        "models",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("latest_version", sa.BigInteger, nullable=False),
        sa.Column("create_time", ts, nullable=False),
        sa.Column("update_time", ts, nullable=False),
    )
    op.create_table(
        "model_tags",
        sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), primary_key=True),
        sa.Column("key", sa.String(63), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    op.create_table(
        "model_versions",
        sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("format", sa.String(63), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("artifact_path", sa.Text, nullable=False),
        sa.Column("lineage", sa.LargeBinary, nullable=False),
        sa.Column("create_time", ts, nullable=False),
    )
    op.create_table(
        "version_tags",
        sa.Column("model", sa.String(63), primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("key", sa.String(63), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(
            ["model", "version"], ["model_versions.model", "model_versions.version"]
        ),
    )
    op.create_table(
        "aliases",
        sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), primary_key=True),
        sa.Column("alias", sa.String(63), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("update_time", ts, nullable=False),
    )
    op.create_table(
        "experiments",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column(
            "sequence",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(63), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("create_time", ts, nullable=False),
    )
    op.create_index("ix_events_model", "events", ["model"])


def downgrade() -> None:
    for table in (
        "events",
        "experiments",
        "aliases",
        "version_tags",
        "model_versions",
        "model_tags",
        "models",
    ):
        op.drop_table(table)

"""Shadow comparisons, for later review.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "shadow_results",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("experiment", sa.String(63), nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("primary_version", sa.BigInteger, nullable=False),
        sa.Column("shadow_version", sa.BigInteger, nullable=False),
        sa.Column("max_abs_diff", sa.Float, nullable=False),
        sa.Column("agreed", sa.Boolean, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("shadow_results")

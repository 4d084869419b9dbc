"""API keys.

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
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("display_name", sa.String(255), nullable=False),
        # HMAC-SHA256(pepper, secret): the secret itself is never stored.
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("previous_secret_hash", sa.String(64), nullable=True),
        sa.Column("previous_secret_expire_time", ts, nullable=True),
        sa.Column("body", sa.LargeBinary, nullable=False),  # serialized Key (no secret)
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("create_time", ts, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("api_keys")

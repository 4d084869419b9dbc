"""The review queue's items table.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "review_items",
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
        sa.UniqueConstraint("source", "source_id", name="uq_review_items_source"),
    )
    op.create_index("ix_review_items_state", "review_items", ["state", "id"])
    op.create_index("ix_review_items_model_state", "review_items", ["model", "state", "decide_us"])
    op.create_index("ix_review_items_submitter_state", "review_items", ["submitter", "state"])

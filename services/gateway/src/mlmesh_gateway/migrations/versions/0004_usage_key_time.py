"""Usage ledger: an index for a key's usage over its quota period.

Quota checks sum one key's events since the period's start
(UsageLedger.tokens_since); with only ix_usage_time that reads every key's
events of the period.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_index("ix_usage_key_time", "usage_events", ["key_id", "create_time"])


def downgrade() -> None:
    op.drop_index("ix_usage_key_time", table_name="usage_events")

"""API keys for the key directory: revisions, SHA-256 secrets, grace secrets.

Every write gives a key the next revision, so services replicate just what
changed (KeyDirectoryService.WatchKeys). Secrets are stored as plain SHA-256
from now on (they are 192 random bits; no pepper to share with the services
that verify them). Keys stored before this migration hold a peppered
HMAC-SHA256, which no service can verify: they stop authenticating and must
be re-created (no deployment of mlmesh predates this change).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("grace_secrets", sa.Text, nullable=True))
        batch.add_column(sa.Column("revision", sa.BigInteger, nullable=False, server_default="0"))
        batch.drop_column("previous_secret_hash")
        batch.drop_column("previous_secret_expire_time")
    op.create_index("ix_api_keys_revision", "api_keys", ["revision"])


def downgrade() -> None:
    op.drop_index("ix_api_keys_revision", table_name="api_keys")
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("previous_secret_hash", sa.String(64), nullable=True))
        batch.add_column(
            sa.Column("previous_secret_expire_time", sa.DateTime(timezone=True), nullable=True)
        )
        batch.drop_column("revision")
        batch.drop_column("grace_secrets")

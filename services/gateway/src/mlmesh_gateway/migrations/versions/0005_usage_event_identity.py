"""Usage ledger: rows keyed by a server-made event id, not the caller's request id.

Keyed by request id, a caller that reused one was billed once for many calls,
and a second key reusing another's id was billed nothing. Now: event_id
(server-made; insert-or-ignore on it keeps a retried flush idempotent),
call_id (the admission's id), request_id kept as an indexed column for
tracing, and the service's own unit and quantity (tokens, rows, vectors,
items). The table is rebuilt (SQLite cannot change a primary key in place);
old rows keep their request id as event and call id.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"

_COMMON = (
    "key_id, service, model, version, region, prompt_tokens, completion_tokens,"
    " input_items, latency_ms, status, create_time"
)


def upgrade() -> None:
    op.create_table(
        "usage_events_v2",
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("call_id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("service", sa.Integer, nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("region", sa.String(63), nullable=False),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("quantity", sa.BigInteger, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("input_items", sa.BigInteger, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_usage_events"),
    )
    # Old rows: Generate (service 1) billed tokens, the others items. Ids
    # longer than the new event id (64) are cut: they were request ids.
    op.execute(
        "INSERT INTO usage_events_v2 (event_id, call_id, request_id, unit, quantity, "
        f"{_COMMON}) SELECT substr(request_id, 1, 64), substr(request_id, 1, 64), request_id,"
        " CASE WHEN service = 1 THEN 'tokens' ELSE 'items' END,"
        " CASE WHEN service = 1 THEN prompt_tokens + completion_tokens ELSE input_items END,"
        f" {_COMMON} FROM usage_events"
    )
    op.drop_table("usage_events")  # with its indexes
    op.rename_table("usage_events_v2", "usage_events")
    op.create_index("ix_usage_time", "usage_events", ["create_time"])
    op.create_index("ix_usage_key_time", "usage_events", ["key_id", "create_time"])
    op.create_index("ix_usage_request", "usage_events", ["request_id"])


def downgrade() -> None:
    # Lossy by nature: calls that shared a request id collapse to the first.
    op.create_table(
        "usage_events_v1",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("service", sa.Integer, nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("region", sa.String(63), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("input_items", sa.BigInteger, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.execute(
        f"INSERT INTO usage_events_v1 (request_id, {_COMMON}) SELECT"
        f" CASE WHEN request_id = '' THEN event_id ELSE request_id END, {_COMMON}"
        " FROM usage_events WHERE 1 = 1 ORDER BY create_time ON CONFLICT DO NOTHING"
    )
    op.drop_table("usage_events")
    op.rename_table("usage_events_v1", "usage_events")
    op.create_index("ix_usage_time", "usage_events", ["create_time"])
    op.create_index("ix_usage_key_time", "usage_events", ["key_id", "create_time"])

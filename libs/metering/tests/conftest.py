"""A real redis-server per test session (on a unix socket in a temp dir), and
the ledger's database: SQLite in a temp dir, and a fresh database on the
machine's PostgreSQL (127.0.0.1:5432), both migrated by the gateway's real
migrations."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import mlmesh_gateway
import pytest
import sqlalchemy as sa
from mlmesh_chassis.database import Database
from mlmesh_chassis.testing import RedisServer

MIGRATIONS = Path(mlmesh_gateway.__file__).parent / "migrations"
PG_ADMIN_URL = os.environ.get(
    "MLMESH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Starts redis-server; yields (url, stop, start) so a test can take it down."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except RuntimeError as error:
        pytest.fail(str(error))
    server.start()
    yield server.url, server.stop, server.start
    server.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    name = f"mlmesh_metering_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(
        PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as error:
        pytest.fail(f"PostgreSQL is required for these tests ({PG_ADMIN_URL}): {error}")
    yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def gateway_database(url: str) -> Database:
    return Database(
        url, name="gateway", migrations=MIGRATIONS, version_table="alembic_version_gateway"
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database(request, tmp_path) -> AsyncIterator[Database]:
    """The ledger's database, migrated: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/g.db"
    else:
        url = request.getfixturevalue("postgres_url")
    db = gateway_database(url)
    await db.migrate()
    yield db
    await db.close()

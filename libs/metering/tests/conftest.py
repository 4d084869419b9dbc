"""A real redis-server per test session (on a unix socket in a temp dir), and
the ledger's database: SQLite in a temp dir, and a fresh database on the
machine's PostgreSQL (127.0.0.1:5432), both migrated by the gateway's real
migrations."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import mlmesh_gateway
import pytest
from mlmesh_chassis.database import Database
from mlmesh_chassis.testing import RedisServer, fresh_postgres_database

MIGRATIONS = Path(mlmesh_gateway.__file__).parent / "migrations"


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
    try:
        with fresh_postgres_database("mlmesh_metering") as url:
            yield url
    except RuntimeError as error:
        pytest.fail(str(error))


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

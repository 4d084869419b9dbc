"""The gateway's database for unit tests: SQLite in a temp dir, then a fresh
database on the machine's PostgreSQL, both migrated by the real migrations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import mlmesh_gateway
import pytest
from mlmesh_chassis.database import Database
from mlmesh_chassis.testing import fresh_postgres_database

MIGRATIONS = Path(mlmesh_gateway.__file__).parent / "migrations"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def gateway_db(request, tmp_path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        database = Database(
            f"sqlite+aiosqlite:///{tmp_path}/g.db",
            name="gateway",
            migrations=MIGRATIONS,
            version_table="alembic_version_gateway",
        )
        await database.migrate()
        yield database
        await database.close()
        return
    with fresh_postgres_database("mlmesh_gateway") as url:
        database = Database(
            url, name="gateway", migrations=MIGRATIONS, version_table="alembic_version_gateway"
        )
        await database.migrate()
        yield database
        await database.close()

"""The gateway's database for unit tests: SQLite in a temp dir, then a fresh
database on the machine's PostgreSQL, both migrated by the real migrations."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from keyring import migrated_gateway_db
from mlmesh_chassis.database import Database
from mlmesh_chassis.testing import fresh_postgres_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def gateway_db(request, tmp_path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        database = await migrated_gateway_db(f"sqlite+aiosqlite:///{tmp_path}/g.db")
        yield database
        await database.close()
        return
    with fresh_postgres_database("mlmesh_gateway") as url:
        database = await migrated_gateway_db(url)
        yield database
        await database.close()

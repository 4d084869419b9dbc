"""The tables the code declares are the tables the migrations make, on both
backends: Alembic's autogenerate finds nothing to add or drop (a column,
type, nullability or index the code assumes but no migration made fails
here, instead of in production)."""

from __future__ import annotations

from pathlib import Path

import mlmesh_gateway
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from mlmesh_chassis.database import Database
from mlmesh_chassis.testing import fresh_postgres_database
from mlmesh_gateway import keys, shadows
from mlmesh_metering import ledger
from mlmesh_registry import db as registry_db


def gateway_database(url: str) -> tuple[Database, sa.MetaData]:
    database = Database(
        url,
        name="gateway",
        migrations=Path(mlmesh_gateway.__file__).parent / "migrations",
        version_table="alembic_version_gateway",
    )
    declared = sa.MetaData()
    for metadata in (keys.metadata, shadows.metadata, ledger.metadata):
        for table in metadata.tables.values():
            table.to_metadata(declared)
    return database, declared


def registry_database(url: str) -> tuple[Database, sa.MetaData]:
    return registry_db.registry_database(url), registry_db.metadata


def _not_a_version_table(name, type_, *_) -> bool:  # type: ignore[no-untyped-def]
    return not (type_ == "table" and str(name).startswith("alembic_version"))


async def differences(database: Database, declared: sa.MetaData) -> list:
    await database.migrate()
    try:
        async with database.engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(
                        sync,
                        opts={"compare_type": True, "include_name": _not_a_version_table},
                    ),
                    declared,
                )
            )
    finally:
        await database.close()


@pytest.mark.parametrize("service", [gateway_database, registry_database])
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_the_declared_tables_are_what_the_migrations_make(service, backend, tmp_path):
    if backend == "sqlite":
        assert await differences(*service(f"sqlite+aiosqlite:///{tmp_path}/s.db")) == []
        return
    with fresh_postgres_database("mlmesh_schema") as url:
        assert await differences(*service(url)) == []

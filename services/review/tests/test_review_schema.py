"""The review table the code declares is the table the migrations make, on
both backends: Alembic's autogenerate finds nothing to add or drop."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from mlmesh_chassis.database import Database
from mlmesh_chassis.testing import fresh_postgres_database
from mlmesh_review.db import metadata, review_database


def _not_a_version_table(name, type_, *_) -> bool:  # type: ignore[no-untyped-def]
    return not (type_ == "table" and str(name).startswith("alembic_version"))


async def differences(database: Database) -> list:
    await database.migrate()
    try:
        async with database.engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(
                        sync,
                        opts={"compare_type": True, "include_name": _not_a_version_table},
                    ),
                    metadata,
                )
            )
    finally:
        await database.close()


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_the_review_table_is_what_the_migrations_make(backend, tmp_path):
    if backend == "sqlite":
        assert await differences(review_database(f"sqlite+aiosqlite:///{tmp_path}/r.db")) == []
        return
    with fresh_postgres_database("mlmesh_review_schema") as url:
        assert await differences(review_database(url)) == []

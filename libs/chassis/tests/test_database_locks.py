"""Services sharing one PostgreSQL database each take their own advisory
locks: one service's writes never wait for another's; replicas of one
service still serialize theirs."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from mlmesh_chassis.database import Database, advisory_lock_key
from mlmesh_chassis.testing import fresh_postgres_database


def test_each_service_has_its_own_stable_lock_keys():
    gateway = Database(
        "sqlite+aiosqlite:///:memory:", name="gateway", version_table="alembic_version_gw"
    )
    registry = Database("sqlite+aiosqlite:///:memory:", name="registry")
    again = Database(
        "sqlite+aiosqlite:///:memory:", name="gateway", version_table="alembic_version_gw"
    )
    keys = {gateway.write_lock_key, gateway.migration_lock_key, registry.write_lock_key}
    assert len(keys) == 3
    assert (again.write_lock_key, again.migration_lock_key) == (
        gateway.write_lock_key,
        gateway.migration_lock_key,
    )
    # A stated key (a service keeping the one its running replicas use) wins.
    assert Database("sqlite+aiosqlite:///:memory:", name="x", write_lock_key=7).write_lock_key == 7
    # Stable across processes (not Python's salted hash()) and a signed bigint.
    assert advisory_lock_key("gateway", "v", "write") == advisory_lock_key("gateway", "v", "write")
    assert -(2**63) <= gateway.write_lock_key < 2**63


@pytest.fixture
def postgres_url():
    try:
        with fresh_postgres_database("mlmesh_locks") as url:
            yield url
    except RuntimeError as error:
        pytest.fail(str(error))


@pytest.mark.postgres
async def test_a_service_writing_does_not_block_another_on_one_database(postgres_url):
    gateway = Database(postgres_url, name="gateway", version_table="alembic_version_gateway")
    gateway_replica = Database(
        postgres_url, name="gateway", version_table="alembic_version_gateway"
    )
    registry = Database(postgres_url, name="registry")
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with gateway.write():
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    try:
        await held.wait()
        async with asyncio.timeout(2.0):  # another service: not blocked
            async with registry.write() as c:
                await c.execute(sa.text("SELECT 1"))
        with pytest.raises(TimeoutError):  # a replica of the same service: waits
            async with asyncio.timeout(0.5):
                async with gateway_replica.write() as c:
                    await c.execute(sa.text("SELECT 1"))
    finally:
        release.set()
        await holder
        for db in (gateway, gateway_replica, registry):
            await db.close()

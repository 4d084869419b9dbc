"""The registry's unit-test fixtures: a real registry, in-process on port 0,
with a temporary SQLite database and artifact directory (started once); and
the domain store on SQLite and on the machine's PostgreSQL (one database
each per session), with a fresh artifact folder per test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mlmesh.registry.v1.registry_service_pb2_grpc import RegistryServiceStub
from mlmesh_chassis.database import Database
from mlmesh_chassis.testing import fresh_postgres_database, keyed_channel
from mlmesh_registry.artifacts import ArtifactStore
from mlmesh_registry.db import registry_database
from mlmesh_registry.store import RegistryStore
from mlmesh_registry.testing import start_test_registry
from registry_fixtures import IDLE_TIMEOUT_S, Registry


@pytest.fixture(scope="session")
async def registry_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Registry]:
    root = tmp_path_factory.mktemp("registry")
    host, secret = await start_test_registry(root, upload_idle_timeout_seconds=IDLE_TIMEOUT_S)
    channel = keyed_channel(f"127.0.0.1:{host.port}", secret)
    try:
        yield Registry(RegistryServiceStub(channel), root / "artifacts")
    finally:
        await channel.close()
        await host.shutdown()


@pytest.fixture
def registry(registry_server: Registry) -> Registry:
    return registry_server


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> str:
    """A model name of this test's own."""
    import hashlib

    return "m-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]


@pytest.fixture(
    scope="session",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Database]:
    """The registry's migrated database on each backend."""
    with _database_url(request.param, tmp_path_factory.mktemp("store")) as url:
        database = registry_database(url)
        await database.migrate()
        try:
            yield database
        finally:
            await database.close()


@contextlib.contextmanager
def _database_url(backend: str, folder: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{folder}/registry.db"
    else:
        with fresh_postgres_database("mlmesh_registry_store") as url:
            yield url


@pytest.fixture
def store(database: Database) -> RegistryStore:
    return RegistryStore(database)


@pytest.fixture
def artifacts(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"))

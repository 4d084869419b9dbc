"""Session fixtures: the real mesh (runner + Envoy + services), started once
per database backend and shared by every test."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from meshkit import MeshInfo, mesh_of, start_mesh, stop_mesh
from mlmesh.registry.v1 import registry_service_pb2_grpc
from mlmesh_sdk.channel import mesh_channel

PG_ADMIN_URL = os.environ.get(
    "MLMESH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _pg_admin() -> sa.Engine:
    # NullPool: the outage test restarts PostgreSQL, which kills pooled connections.
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, dropped afterwards."""
    name = f"mlmesh_test_{uuid.uuid4().hex[:8]}"
    engine = _pg_admin()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as error:
        pytest.fail(f"PostgreSQL is required for these tests ({PG_ADMIN_URL}): {error}")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


# The LLM engine in the test mesh: few slots, so queueing and slot reuse are
# exercised with little CPU.
LLM_TEST_ENV = {
    "MLMESH_LLM_MAX_RUNNING": "8",
    "MLMESH_LLM_MAX_WAITING": "80",
    "MLMESH_LLM_TORCH_THREADS": "1",
    # No demo events: the stream test sends its own, and the llm's timing
    # tests keep the CPU the demo streamer and Flink's work on it would take.
    "MLMESH_FLINK_DEMO": "off",
    # The batch service's local Ray head stops once its jobs are done, so its
    # idle processes do not share the cores with the tests after it.
    "MLMESH_BATCH_RAY_IDLE_STOP_SECONDS": "3",
}


@pytest.fixture(scope="session")
def meshes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Starts each backend's mesh on first use, once per session.

    sqlite: every registered service. postgres: the registry and the key
    directory alone, on a fresh database of the machine's PostgreSQL.
    """
    started: dict[str, tuple[subprocess.Popen, MeshInfo]] = {}

    def get(backend: str) -> MeshInfo:
        if backend not in started:
            state_dir = tmp_path_factory.mktemp(f"mesh-{backend}")
            if backend == "postgres":
                env = {"MLMESH_REGISTRY_DATABASE_URL": request.getfixturevalue("postgres_url")}
                process, ready = start_mesh(state_dir, env, services=mesh_of("registry"))
            else:
                # --observe: Phoenix and Prometheus too (tests/test_observe_mesh.py).
                process, ready = start_mesh(
                    state_dir, LLM_TEST_ENV, extra_args=("--observe", "--scrape-interval", "2s")
                )
            started[backend] = (
                process,
                MeshInfo(
                    backend,
                    ready["address"],
                    ready["admin"],
                    state_dir,
                    ready["services"],
                    ready["api_key"],
                ),
            )
        return started[backend][1]

    yield get
    for process, _ in started.values():
        stop_mesh(process)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def mesh(request: pytest.FixtureRequest, meshes) -> MeshInfo:
    """The registry's tests run on both backends."""
    return meshes(request.param)


@pytest.fixture(scope="session")
def full_mesh(meshes) -> MeshInfo:
    """Every service (SQLite backend)."""
    return meshes("sqlite")


@pytest.fixture
async def registry(mesh: MeshInfo):
    """A RegistryService stub through Envoy, with the mesh's admin key."""
    async with mesh_channel(mesh.address, mesh.api_key) as channel:
        yield registry_service_pb2_grpc.RegistryServiceStub(channel)


@pytest.fixture
def unique() -> str:
    """A fresh, valid resource name for one test."""
    return f"m-{uuid.uuid4().hex[:10]}"

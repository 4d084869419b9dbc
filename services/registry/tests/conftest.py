"""A real registry, in-process on port 0, with a temporary SQLite database and
artifact directory; started once for the registry's unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_REGISTRY
from mlmesh.registry.v1.registry_service_pb2_grpc import RegistryServiceStub
from mlmesh_chassis.testing import bootstrap_keys_file, keyed_channel
from mlmesh_registry.config import RegistrySettings
from mlmesh_registry.server import build_server
from registry_fixtures import IDLE_TIMEOUT_S, Registry


@pytest.fixture(scope="session")
async def registry_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Registry]:
    root = tmp_path_factory.mktemp("registry")
    keys, secret = bootstrap_keys_file(root, [PLATFORM_SERVICE_REGISTRY])
    settings = RegistrySettings(
        bootstrap_keys_file=keys,
        port=0,
        metrics_port=-1,
        database_url=f"sqlite+aiosqlite:///{root}/r.db",
        artifact_url=str(root / "artifacts"),
        drain_seconds=0.0,
        grace_seconds=1.0,
        upload_idle_timeout_seconds=IDLE_TIMEOUT_S,
    )
    host = await build_server(settings)
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

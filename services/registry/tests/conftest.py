"""A real registry, in-process on port 0, with a temporary SQLite database and
artifact directory; started once for the registry's unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from mlmesh.registry.v1.registry_service_pb2_grpc import RegistryServiceStub
from mlmesh_chassis.testing import keyed_channel
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

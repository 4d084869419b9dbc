"""A real registry, in-process on port 0, with a temporary SQLite database and
artifact directory; started once for the SDK's tests. Its one key (a
bootstrap key: no gateway runs here) is in MLMESH_API_KEY during each test,
where the SDK and the CLI read it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_REGISTRY
from mlmesh_chassis.testing import bootstrap_keys_file
from mlmesh_registry.config import RegistrySettings
from mlmesh_registry.server import build_server


@pytest.fixture(scope="session")
async def registry_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[str, str]]:
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
    )
    host = await build_server(settings)
    try:
        yield f"127.0.0.1:{host.port}", secret
    finally:
        await host.shutdown()


@pytest.fixture
def registry_target(registry_server: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    target, secret = registry_server
    monkeypatch.setenv("MLMESH_API_KEY", secret)
    return target

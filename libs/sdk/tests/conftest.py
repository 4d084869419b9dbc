"""A real registry, in-process on port 0, with a temporary SQLite database and
artifact directory; started once for the SDK's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from mlmesh_registry.config import RegistrySettings
from mlmesh_registry.server import build_server


@pytest.fixture(scope="session")
async def registry_target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    root = tmp_path_factory.mktemp("registry")
    settings = RegistrySettings(
        port=0,
        metrics_port=-1,
        database_url=f"sqlite+aiosqlite:///{root}/r.db",
        artifact_url=str(root / "artifacts"),
        drain_seconds=0.0,
        grace_seconds=1.0,
    )
    host = await build_server(settings)
    try:
        yield f"127.0.0.1:{host.port}"
    finally:
        await host.shutdown()

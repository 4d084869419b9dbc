"""A real registry, in-process on port 0, with a temporary SQLite database and
artifact directory; started once for the SDK's tests. Its one key (a
bootstrap key: no gateway runs here) is in MLMESH_API_KEY during each test,
where the SDK and the CLI read it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from mlmesh_registry.testing import start_test_registry


@pytest.fixture(scope="session")
async def registry_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[str, str]]:
    host, secret = await start_test_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield f"127.0.0.1:{host.port}", secret
    finally:
        await host.shutdown()


@pytest.fixture
def registry_target(registry_server: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    target, secret = registry_server
    monkeypatch.setenv("MLMESH_API_KEY", secret)
    return target

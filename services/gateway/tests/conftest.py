"""A real redis-server per test session, on a unix socket in a temp dir."""

from __future__ import annotations

import pytest
from mlmesh_chassis.testing import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Starts redis-server; yields (url, stop, start) so a test can take it down."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except RuntimeError as error:
        pytest.fail(str(error))
    server.start()
    yield server.url, server.stop, server.start
    server.stop()

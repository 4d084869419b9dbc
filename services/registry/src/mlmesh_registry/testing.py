"""A real registry for other packages' tests: in process, on port 0, with a
SQLite database and artifact folder under ``root``, and one key (a bootstrap
key: no gateway runs beside it) holding the REGISTRY scope."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_REGISTRY
from mlmesh_chassis.server import ServiceHost
from mlmesh_chassis.testing import bootstrap_keys_file

from mlmesh_registry.config import RegistrySettings
from mlmesh_registry.server import build_server


async def start_test_registry(root: Path, **settings: Any) -> tuple[ServiceHost, str]:
    """(the started server, the secret of its one key)."""
    keys, secret = bootstrap_keys_file(root, [PLATFORM_SERVICE_REGISTRY])
    defaults: dict[str, Any] = {
        "port": 0,
        "metrics_port": -1,
        "database_url": f"sqlite+aiosqlite:///{root}/r.db",
        "artifact_url": str(root / "artifacts"),
        "drain_seconds": 0.0,
        "grace_seconds": 1.0,
    }
    host = await build_server(
        RegistrySettings(bootstrap_keys_file=keys, **{**defaults, **settings})
    )
    return host, secret

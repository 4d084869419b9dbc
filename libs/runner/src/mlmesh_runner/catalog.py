"""The services the local runner starts: one entry per service.

A later service joins the mesh by adding one ``ServiceSpec`` here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import descriptor


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one mesh service locally."""

    name: str
    # argv; the runner adds MLMESH_<NAME>_PORT=0 and a port file to the env.
    command: Sequence[str]
    # The gRPC services it serves (routes and health checks come from these).
    services: Callable[[], Sequence[descriptor.ServiceDescriptor]]
    # Environment prefix of its settings, e.g. MLMESH_REGISTRY_.
    env_prefix: str
    # Extra environment, given the runner's state directory.
    env: Callable[[Path], dict[str, str]] = field(default=lambda state: {})
    # Seconds to wait for health SERVING at start.
    start_timeout: float = 60.0


def _registry_services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.registry.v1 import registry_service_pb2

    return [registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]]


CATALOG: list[ServiceSpec] = [
    ServiceSpec(
        name="registry",
        command=[sys.executable, "-m", "mlmesh_registry"],
        services=_registry_services,
        env_prefix="MLMESH_REGISTRY_",
        env=lambda state: {
            "MLMESH_REGISTRY_DATABASE_URL": f"sqlite+aiosqlite:///{state}/registry.db",
            "MLMESH_REGISTRY_ARTIFACT_URL": str(state / "artifacts"),
        },
    ),
]

"""The registry's registration in the mesh (entry point ``mlmesh.services``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from google.protobuf import descriptor
from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh_chassis.registration import ServiceRegistration, route


def _services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.registry.v1 import registry_service_pb2

    return [registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]]


REGISTRATION = ServiceRegistration(
    name="registry",
    command=lambda ctx, port: [sys.executable, "-m", "mlmesh_registry"],
    services=_services,
    routes=(
        route(
            "/mlmesh.registry.v1.RegistryService/",
            {S.PLATFORM_SERVICE_REGISTRY},
            {S.PLATFORM_SERVICE_REGISTRY, S.PLATFORM_SERVICE_REGISTRY_READ},
        ),
    ),
    # It meters its callers' requests into the gateway's ledger.
    key_scopes=("KEY_DIRECTORY", "USAGE_RECORD"),
    env_prefix="MLMESH_REGISTRY_",
    env=lambda ctx: {
        "MLMESH_REGISTRY_DATABASE_URL": f"sqlite+aiosqlite:///{ctx.state}/registry.db",
        "MLMESH_REGISTRY_ARTIFACT_URL": str(ctx.state / "artifacts"),
    },
)

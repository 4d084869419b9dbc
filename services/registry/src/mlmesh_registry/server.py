"""build_server(settings): the registry's clients, servicer and server."""

from __future__ import annotations

from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_REGISTRY
from mlmesh.registry.v1 import registry_service_pb2_grpc
from mlmesh_chassis.server import ServiceHost, start_service
from mlmesh_metering.metering import metered_calls

from mlmesh_registry.artifacts import ArtifactStore
from mlmesh_registry.config import RegistrySettings
from mlmesh_registry.db import registry_database
from mlmesh_registry.registration import REGISTRATION
from mlmesh_registry.servicer import RegistryServicer
from mlmesh_registry.store import RegistryStore


async def build_server(settings: RegistrySettings) -> ServiceHost:
    """Migrates the schema, opens the stores and starts serving."""
    database = registry_database(settings.database_url, settings.database_connect_timeout)
    await database.migrate()  # fails fast when the database is unreachable
    artifacts = ArtifactStore(settings.artifact_url)
    artifacts.sweep_partials()
    servicer = RegistryServicer(RegistryStore(database), artifacts, settings)
    # Every caller's requests per minute and usage (one event per call, into
    # the gateway's ledger); off when no ledger is configured (standalone).
    admission, meter = metered_calls(settings, PLATFORM_SERVICE_REGISTRY)

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
        return REGISTRATION.service_names()

    host = await start_service(
        settings,
        register,
        error_domain="mlmesh.registry",
        admission=admission,
    )
    host.on_close.append(database.close)
    if meter is not None:
        host.on_close.append(meter.close)
    return host

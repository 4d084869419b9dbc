"""build_server(settings): the batch service over its database and Ray."""

from __future__ import annotations

import asyncio

from mlmesh.batch.v1 import batch_service_pb2_grpc
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_BATCH
from mlmesh_chassis.server import ServiceHost, start_service
from mlmesh_metering.metering import metered_calls
from mlmesh_sdk.registry import RegistryClient

from mlmesh_batch.config import BatchSettings
from mlmesh_batch.db import batch_database
from mlmesh_batch.jobs import Supervisor
from mlmesh_batch.registration import REGISTRATION
from mlmesh_batch.servicer import BatchServicer
from mlmesh_batch.validation import Limits


async def build_server(settings: BatchSettings) -> ServiceHost:
    settings.root.mkdir(parents=True, exist_ok=True)
    for root in settings.roots():
        root.mkdir(parents=True, exist_ok=True)
    database = batch_database(settings.database)
    await database.migrate()
    admission, meter = metered_calls(settings, PLATFORM_SERVICE_BATCH)
    supervisor = Supervisor(settings, database, meter)
    limits = Limits(
        allowed_roots=settings.roots(),
        allowed_protocols=settings.protocols(),
        gateway_configured=bool(settings.gateway_target),
        part_rows=settings.part_rows,
        part_seconds=settings.part_seconds,
    )
    registry = await RegistryClient(settings.registry_target).__aenter__()

    async def resolve(reference: ModelReference):  # type: ignore[no-untyped-def]
        return await registry.resolve(reference)

    servicer = BatchServicer(supervisor, limits, resolve)

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        batch_service_pb2_grpc.add_BatchServiceServicer_to_server(servicer, server)
        return REGISTRATION.service_names()

    host = await start_service(settings, register, error_domain="mlmesh.batch", admission=admission)
    await supervisor.start()
    if settings.demo:
        from mlmesh_batch.demo import write_demo

        await asyncio.to_thread(write_demo, settings)
    # on_close runs last first: the supervisor stops after the server.
    host.on_close.append(database.close)
    host.on_close.append(registry.close)
    if meter is not None:
        host.on_close.append(meter.close)
    host.on_close.append(supervisor.close)
    return host

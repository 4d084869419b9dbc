"""build_server(settings): the feature service over its Feast repository."""

from __future__ import annotations

import asyncio

from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_FEATURES
from mlmesh_chassis.server import ServiceHost, start_service
from mlmesh_metering.metering import metered_calls

from mlmesh_features.config import FeaturesSettings
from mlmesh_features.operations import OperationRunner
from mlmesh_features.registration import REGISTRATION
from mlmesh_features.servicer import STORE_ERRORS, FeatureServicer
from mlmesh_features.store import FeastThread, FeatureStore
from mlmesh_features.streaming.loader import StreamLoader


async def build_server(settings: FeaturesSettings) -> ServiceHost:
    feast = FeastThread()
    # Reading the definitions in force (and Feast's imports) is file work:
    # on the Feast thread, not the event loop.
    # Feast is built (and its modules imported) before the service serves.
    store = await feast.run(
        lambda: FeatureStore(
            settings.root,
            settings.online_store_config(),
            settings.registry or None,
            timeout_s=settings.store_timeout_seconds,
        )
    )
    await feast.run(store.feast)
    # Long-running operations: what a previous process left undone resumes.
    # (Opening its log is file work: on a worker thread.)
    operations = await asyncio.to_thread(
        lambda: OperationRunner(
            store,
            feast,
            store_errors=STORE_ERRORS,
            max_pending=settings.max_pending_operations,
            chunk_events=settings.materialize_chunk_events,
        )
    )
    servicer = FeatureServicer(store, feast, settings.store_timeout_seconds, operations=operations)

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        features_service_pb2_grpc.add_FeatureServiceServicer_to_server(servicer, server)
        return REGISTRATION.service_names()

    admission, meter = metered_calls(settings, PLATFORM_SERVICE_FEATURES)
    host = await start_service(
        settings, register, error_domain="mlmesh.features", admission=admission
    )
    if meter is not None:
        host.on_close.append(meter.close)
    host.on_close.append(feast.close)
    if settings.streaming:
        # Cancelled on shutdown, before Feast closes.
        host.background.append(asyncio.create_task(StreamLoader(store, feast).run()))
    host.on_close.append(store.close)  # the online store's clients, after the runner
    # on_close runs last first: the runner finishes its chunk before Feast closes.
    await operations.start()
    host.on_close.append(operations.stop)
    return host

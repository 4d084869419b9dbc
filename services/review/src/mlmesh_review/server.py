"""build_server(settings): the review service over its database."""

from __future__ import annotations

import asyncio

from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_REVIEW
from mlmesh.review.v1 import review_service_pb2_grpc
from mlmesh_chassis.server import ServiceHost, start_service
from mlmesh_metering.metering import metered_calls
from mlmesh_sdk.registry import RegistryClient

from mlmesh_review.config import ReviewSettings
from mlmesh_review.db import review_database
from mlmesh_review.queue import ReviewQueue
from mlmesh_review.registration import REGISTRATION
from mlmesh_review.servicer import ReviewServicer
from mlmesh_review.web import ReviewPage


async def build_server(settings: ReviewSettings) -> ServiceHost:
    settings.root.mkdir(parents=True, exist_ok=True)
    database = review_database(settings.database)
    await database.migrate()
    admission, meter = metered_calls(settings, PLATFORM_SERVICE_REVIEW)
    queue = ReviewQueue(database, settings.max_open_items, settings.max_open_reports_per_key)
    await queue.refresh_stats()
    # Exports are uploaded with this service's own key (its REGISTRY scope):
    # the client's interceptors add it.
    registry = await RegistryClient(settings.registry_target, transfer_timeout=300.0).__aenter__()
    servicer = ReviewServicer(
        queue, registry, settings.root / "exports", settings.default_lease_seconds
    )

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        review_service_pb2_grpc.add_ReviewServiceServicer_to_server(servicer, server)
        return REGISTRATION.service_names()

    # The reviewers' page: bound before the port file is written.
    page = ReviewPage() if settings.http_port is not None else None
    extra_ports = {}
    if page is not None:
        assert settings.http_port is not None
        extra_ports["http_port"] = await page.start(settings.host, settings.http_port)

    host = await start_service(
        settings,
        register,
        error_domain="mlmesh.review",
        admission=admission,
        extra_ports=extra_ports,
    )
    host.background.append(asyncio.create_task(queue.refresh_stats_forever(settings.stats_seconds)))
    # on_close runs last first: the database closes after the server stopped.
    host.on_close.append(database.close)
    host.on_close.append(registry.close)
    if meter is not None:
        host.on_close.append(meter.close)
    if page is not None:
        host.on_close.append(page.close)
    return host

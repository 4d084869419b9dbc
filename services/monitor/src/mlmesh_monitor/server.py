"""build_server(settings): the monitor over its database."""

from __future__ import annotations

import asyncio
import datetime as dt

from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_MONITOR
from mlmesh.monitor.v1 import monitor_service_pb2_grpc
from mlmesh_chassis.server import ServiceHost, start_service
from mlmesh_metering.metering import metered_calls

from mlmesh_monitor.analysis import Analysis
from mlmesh_monitor.config import MonitorSettings
from mlmesh_monitor.db import monitor_database
from mlmesh_monitor.gauges import GaugeRefresher
from mlmesh_monitor.registration import REGISTRATION
from mlmesh_monitor.servicer import MonitorServicer
from mlmesh_monitor.store import MonitorStore


async def build_server(settings: MonitorSettings) -> ServiceHost:
    settings.root.mkdir(parents=True, exist_ok=True)
    database = monitor_database(settings.database)
    await database.migrate()
    store = MonitorStore(database)
    if settings.demo:
        from mlmesh_monitor.demo import ensure_demo_reference

        await ensure_demo_reference(store)
    analysis = Analysis(store, settings)
    admission, meter = metered_calls(settings, PLATFORM_SERVICE_MONITOR)
    servicer = MonitorServicer(store, analysis)

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        monitor_service_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, server)
        return REGISTRATION.service_names()

    host = await start_service(
        settings, register, error_domain="mlmesh.monitor", admission=admission
    )
    review = None
    if settings.review_target and settings.low_confidence:
        from mlmesh_monitor.review import LowConfidenceReview, parse_policies, review_submitter

        submit, close_review = review_submitter(settings.review_target)
        review = LowConfidenceReview(
            store,
            parse_policies(settings.low_confidence),
            submit,
            window=dt.timedelta(seconds=settings.low_confidence_window_seconds),
            min_predictions=settings.low_confidence_min_predictions,
            max_items=settings.low_confidence_max_items,
        )
    refresher = GaugeRefresher(store, analysis, settings, review)
    host.background.append(asyncio.get_running_loop().create_task(refresher.run()))
    host.on_close.append(database.close)
    if review is not None:
        host.on_close.append(close_review)
    if meter is not None:
        host.on_close.append(meter.close)
    return host

"""Server bootstrap: the one start-up and shutdown sequence of every service.

config -> clients -> grpc.aio.server(interceptors) -> servicers + health (every
full service name and "") + reflection -> bind (port 0 allowed) -> start ->
SERVING (or, with a ready hook, NOT_SERVING until the hook returns).
SIGTERM/SIGINT: NOT_SERVING (Envoy's health checks drain us) -> a short
drain -> server.stop(grace) -> close clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from mlmesh_chassis.auth import (
    CallAdmission,
    CallerCheck,
    KeyView,
    KeyWatcher,
    ServiceIdentity,
    peer_target,
    read_bootstrap_keys,
    set_service_identity,
)
from mlmesh_chassis.channels import MESSAGE_SIZE_OPTIONS
from mlmesh_chassis.config import ServiceSettings
from mlmesh_chassis.contracts import all_services
from mlmesh_chassis.interceptors import ServerInterceptor
from mlmesh_chassis.logs import configure_logging
from mlmesh_chassis.metrics import start_metrics_server
from mlmesh_chassis.tracing import configure_tracing
from mlmesh_chassis.validation import compile_rules, request_types

log = logging.getLogger("mlmesh.server")
# The health service name that is SERVING while this service's key view is
# current with the key directory (for operators and the runner; a service
# also serves before it, from its bootstrap keys).
KEY_DIRECTORY_HEALTH = "mlmesh.keys"


@dataclass
class ServiceHost:
    """A started server: its ports, health servicer and shutdown hooks."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    metrics_port: int | None
    service_names: Sequence[str]
    settings: ServiceSettings
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Tasks the service runs beside the server; cancelled on shutdown.
    background: list[asyncio.Task[None]] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def shutdown(self) -> None:
        """NOT_SERVING, drain, stop with grace, then close clients."""
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(self.settings.drain_seconds)
        await self.server.stop(self.settings.grace_seconds)
        for task in self.background:
            task.cancel()
        for close in reversed(self.on_close):
            with contextlib.suppress(Exception):
                await close()
        log.info("stopped")


Register = Callable[[grpc.aio.Server], Sequence[str]]


def key_view_for(settings: ServiceSettings) -> tuple[KeyView, KeyWatcher | None]:
    """The service's replica of the keys (seeded with the bootstrap keys) and
    the watcher that keeps it current, from the settings."""
    view = KeyView()
    if settings.bootstrap_keys_file is not None:
        view.seed(read_bootstrap_keys(settings.bootstrap_keys_file))
    target = peer_target(settings.keys_target, settings.keys_target_file)
    if target is None:
        log.warning("no key directory configured: only bootstrap keys will authenticate")
        return view, None
    return view, KeyWatcher(view, target, ServiceIdentity(settings.service_key_file))


async def start_service(
    settings: ServiceSettings,
    register: Register,
    *,
    error_domain: str,
    ready: Callable[[], Awaitable[object]] | None = None,
    key_view: KeyView | None = None,
    admission: CallAdmission | None = None,
    extra_ports: dict[str, int] | None = None,
) -> ServiceHost:
    """Builds, binds and starts a server; ``register`` adds servicers and
    returns their full service names. Health is SERVING at once, or, given
    ``ready`` (for a service that must load something first), NOT_SERVING
    until ``ready()`` returns.

    Every call but health and reflection is checked against ``key_view``
    (default: one built from the settings and kept current from the
    gateway's key directory); ``admission`` is entered around every verified
    call (per-key limits, usage). ``extra_ports`` (e.g. an HTTP surface's
    ``http_port``) go into the port file beside the gRPC and metrics ports."""
    if settings.service_key_file is not None:
        set_service_identity(ServiceIdentity(settings.service_key_file))
    watcher = None
    if key_view is None:
        key_view, watcher = key_view_for(settings)
    server = grpc.aio.server(
        interceptors=[
            ServerInterceptor(settings.service_name, error_domain, CallerCheck(key_view, admission))
        ],
        options=[
            *MESSAGE_SIZE_OPTIONS,
            ("grpc.so_reuseport", 0),
        ],
    )
    names = list(register(server))
    compile_rules(request_types(names))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Every mlmesh contract, so any service answers grpcurl through Envoy.
    described = {s.full_name for s in all_services()} | set(names)
    reflection.enable_server_reflection(
        [
            *sorted(described),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    metrics_port = (
        start_metrics_server(settings.host, settings.metrics_port)
        if settings.metrics_port >= 0
        else None
    )
    await server.start()
    host = ServiceHost(server, health, port, metrics_port, names, settings)
    if watcher is not None:

        async def keys_current(current: bool) -> None:
            await health.set(
                KEY_DIRECTORY_HEALTH,
                health_pb2.HealthCheckResponse.SERVING
                if current
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )

        await keys_current(False)
        watcher.on_connected = keys_current
        host.background.append(asyncio.get_running_loop().create_task(watcher.run()))
    await host.set_serving(ready is None)
    if ready is not None:
        host.background.append(asyncio.get_running_loop().create_task(_serve_when(ready, host)))
    if settings.port_file:
        tmp = settings.port_file.with_suffix(".tmp")
        ports = {"port": port, "metrics_port": metrics_port, **(extra_ports or {})}
        tmp.write_text(json.dumps({**ports, "pid": os.getpid()}))
        tmp.replace(settings.port_file)
    log.info("serving", extra={"port": port, "metrics_port": metrics_port, "services": names})
    return host


async def _serve_when(ready: Callable[[], Awaitable[object]], host: ServiceHost) -> None:
    """SERVING once ``ready()`` returns; NOT_SERVING for good if it fails."""
    try:
        await ready()
    except Exception:
        log.exception("not ready: health stays NOT_SERVING")
        return
    await host.set_serving(True)
    log.info("ready: SERVING", extra={"services": host.service_names})


async def run_until_signalled(host: ServiceHost) -> None:
    """Waits for SIGTERM/SIGINT, then shuts down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received; draining")
    await host.shutdown()


def bootstrap(settings: ServiceSettings) -> None:
    """Logging and tracing for a service process (call first in main)."""
    configure_logging(settings.service_name, settings.log_level)
    configure_tracing(settings.service_name, settings.otel_exporter)
    # Calls to peers carry this service's own key from the start.
    set_service_identity(ServiceIdentity(settings.service_key_file))
    log.info("starting", extra={"settings": settings.public_dict()})


def serve_main(
    settings_type: Callable[[], ServiceSettings], build: Callable[[Any], Awaitable[ServiceHost]]
) -> None:
    """A service's ``main()``: settings, logging and tracing, build, run until
    SIGTERM/SIGINT, then shut down gracefully."""

    settings = settings_type()

    async def run() -> None:
        bootstrap(settings)
        host = await build(settings)
        await run_until_signalled(host)

    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())

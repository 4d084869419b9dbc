"""One registration per service: everything the mesh needs to know about it.

A service joins the mesh with one folder (``services/<name>``) and one entry
point in its own ``pyproject.toml``::

    [project.entry-points."mlmesh.services"]
    <name> = "mlmesh_<name>.registration:REGISTRATION"

``REGISTRATION`` is a ``ServiceRegistration``. The runner starts every
registered service in start order (``after``), Envoy routes its
``services``, every chassis service checks each RPC's scopes against its
``routes`` (``mlmesh_chassis.auth.scopes_for``), and its own key gets
``key_scopes``. A registration module is imported by every service process
(for the scopes), so it imports nothing heavy: descriptors are returned by a
function, and commands and readiness checks import what they need inside.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from google.protobuf import descriptor

ENTRY_POINT_GROUP = "mlmesh.services"
# The display name of a service's bootstrap key (the operator's tooling makes
# one per service; metering finds ``billed_by`` services' key ids by it).
SERVICE_KEY_NAME = "service {}"
DEFAULT_REGION = "local"
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]{0,30}")
ENV_PREFIX_PATTERN = re.compile(r"MLMESH_[A-Z][A-Z0-9]{0,30}_")


@dataclass(frozen=True)
class RunContext:
    """What a registration's callables may use when the runner starts it:
    the state directory, the instances started so far (``llm``, ``llm.1``,
    ...), the region each instance is placed in, and the host each instance
    is reached at (default 127.0.0.1; Compose's bridge networks name each
    service's container)."""

    state: Path
    ports: dict[str, int]
    regions: dict[str, str] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)

    def address(self, service: str) -> str:
        return f"{self.hosts.get(service, '127.0.0.1')}:{self.ports[service]}"

    def region(self, instance: str) -> str:
        return self.regions.get(instance, DEFAULT_REGION)

    def instances(self, service: str) -> list[str]:
        """The started instances of a service: its name, then name.1, name.2, ..."""
        return [name for name in self.ports if name == service or name.startswith(f"{service}.")]


# (path prefix, scopes any of which allows a writing call, scopes for a
# read-only call: idempotency_level NO_SIDE_EFFECTS in the contract). Scopes
# are mlmesh.gateway.v1.PlatformService values.
Route = tuple[str, frozenset[int], frozenset[int]]


def route(prefix: str, write: Iterable[int], read: Iterable[int] | None = None) -> Route:
    """A route: ``write`` scopes (any one allows the call; none: any valid
    key), and ``read`` scopes for read-only methods (default: the same)."""
    if not prefix.startswith("/mlmesh."):
        raise ValueError(f"route {prefix!r} is not an mlmesh contract's path")
    return prefix, frozenset(write), frozenset(write if read is None else read)


async def http_ok(port: int, path: str = "/") -> bool:
    """Readiness of a program without grpc.health: ``GET path`` on loopback
    answers 200 (2 s to connect, 5 s for the status line)."""
    import asyncio

    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout=2.0
        )
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), timeout=5.0)
        return status.split(b" ")[1:2] == [b"200"]
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


def _no_services() -> Sequence[descriptor.ServiceDescriptor]:
    return ()


@dataclass(frozen=True)
class ServiceRegistration:
    """How the mesh runs, routes and authorizes one service."""

    name: str
    # argv, given the context and the port to bind (0 on first start; the
    # same port on a restart). Chassis services also get <env_prefix>PORT and
    # <env_prefix>PORT_FILE in their environment.
    command: Callable[[RunContext, int], Sequence[str]]
    # The gRPC services Envoy routes to it; the first one's health is its
    # readiness (unless ``ready`` is given).
    services: Callable[[], Sequence[descriptor.ServiceDescriptor]]
    # Environment prefix of its settings, e.g. MLMESH_REGISTRY_.
    env_prefix: str
    # The scopes each of its RPCs needs. First match wins within a service;
    # two services' prefixes never overlap; a method no route covers is
    # refused (deny by default).
    routes: tuple[Route, ...] = ()
    # Services it starts after, when they run too (it calls them at start,
    # or routes to them).
    after: tuple[str, ...] = ()
    # gRPC services it serves that Envoy does not route (peers reach them on
    # its own port or socket).
    unrouted_services: Callable[[], Sequence[descriptor.ServiceDescriptor]] = _no_services
    # Whether it owns the keys (KeyDirectoryService): every other chassis
    # service follows its directory.
    key_directory: bool = False
    # Default environment (the caller's environment overrides it).
    env: Callable[[RunContext], dict[str, str]] = field(default=lambda ctx: {})
    # Environment that overrides the caller's.
    fixed_env: dict[str, str] = field(default_factory=dict)
    # A command to run to completion before the service starts (e.g. to build
    # and register a model), or None.
    prepare: Callable[[RunContext], Sequence[str]] | None = None
    # Seconds to wait for health SERVING at start.
    start_timeout: float = 60.0
    # How its port is learnt: the chassis' port file, or (for other programs)
    # the socket the process listens on.
    port_discovery: Literal["port-file", "listening-socket"] = "port-file"
    # Readiness check given the port, for programs without grpc.health
    # (None: grpc.health.v1 for services()[0]).
    ready: Callable[[int], Awaitable[bool]] | None = None
    # Whether Envoy routes to it.
    routed: bool = True
    # Plain-HTTP path prefixes (not gRPC) Envoy routes to the service's HTTP
    # port, e.g. the gateway's OpenAI-compatible ``/v1/``. The runner sets
    # <env_prefix>HTTP_PORT (0 on first start, the same port on a restart);
    # the service writes the bound port to its port file as ``http_port``
    # and answers ``GET /healthz``.
    http_routes: tuple[str, ...] = ()
    # A slow starter the services after it need only the address of (vLLM's
    # own server: over a minute): the runner picks its port, starts it, goes
    # on with the others and waits for it to be ready before Envoy starts.
    start_in_background: bool = False
    # The scopes of its own service key (PlatformService names without the
    # PLATFORM_SERVICE_ prefix): what it calls on its peers. Every chassis
    # service also follows the key directory.
    key_scopes: tuple[str, ...] = ("KEY_DIRECTORY",)
    # Services whose calls to it are billed elsewhere, so it does not meter
    # them again (the gateway bills the application's key for the traffic it
    # relays to the llm). Their service keys' ids reach it as
    # <env_prefix>UNMETERED_SERVICES (resolved through the bootstrap keys).
    billed_by: tuple[str, ...] = ()
    # Whether its first instance is the only writer: with replicas, Envoy
    # sends its writing methods (those not NO_SIDE_EFFECTS) to the first
    # instance and its reads to all (the vector service's read replicas).
    # Each instance learns its name as <env_prefix>INSTANCE.
    single_writer: bool = False

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"service name {self.name[:40]!r} is not {NAME_PATTERN.pattern}")
        if not ENV_PREFIX_PATTERN.fullmatch(self.env_prefix):
            raise ValueError(
                f"{self.name}: env prefix {self.env_prefix[:40]!r} is not "
                f"{ENV_PREFIX_PATTERN.pattern}"
            )

    def service_names(self) -> list[str]:
        """Every gRPC service it serves (the names its health reports)."""
        return [s.full_name for s in (*self.services(), *self.unrouted_services())]


def start_order(found: Iterable[ServiceRegistration]) -> tuple[ServiceRegistration, ...]:
    """Each service after the ones it names in ``after`` (those that are
    present), otherwise by name; a slow starter (``start_in_background``) as
    early as it may be, so its start overlaps the others'. Checks names are
    unique, there is no cycle, at most one key directory, and no two
    services' routes overlap."""
    by_name: dict[str, ServiceRegistration] = {}
    for registration in found:
        if registration.name in by_name:
            raise ValueError(f"service {registration.name} is registered twice")
        by_name[registration.name] = registration
    if sum(r.key_directory for r in by_name.values()) > 1:
        raise ValueError("more than one service registers as the key directory")
    _check_routes_disjoint(by_name.values())
    ordered: list[ServiceRegistration] = []
    started: set[str] = set()
    pending = sorted(by_name.values(), key=lambda r: (not r.start_in_background, r.name))
    while pending:
        next_up = next(
            (r for r in pending if {n for n in r.after if n in by_name} <= started), None
        )
        if next_up is None:
            raise ValueError(f"the start order has a cycle among {[r.name for r in pending]}")
        ordered.append(next_up)
        started.add(next_up.name)
        pending.remove(next_up)
    return tuple(ordered)


def _check_routes_disjoint(found: Iterable[ServiceRegistration]) -> None:
    owners: list[tuple[str, str]] = [(p, r.name) for r in found for p, _, _ in r.routes]
    for prefix, owner in owners:
        for other, other_owner in owners:
            if owner != other_owner and other.startswith(prefix):
                raise ValueError(f"{owner}'s route {prefix} covers {other_owner}'s {other}")


@functools.cache
def registrations() -> tuple[ServiceRegistration, ...]:
    """Every installed service's registration, in start order."""
    found = []
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        registration = entry.load()
        if not isinstance(registration, ServiceRegistration):
            raise TypeError(f"entry point {entry.value} is not a ServiceRegistration")
        if registration.name != entry.name:
            raise ValueError(f"entry point {entry.name} names service {registration.name}")
        found.append(registration)
    return start_order(found)


def key_directory_service() -> str | None:
    """The registered service that owns the keys, if any."""
    return next((r.name for r in registrations() if r.key_directory), None)


def route_table(found: Iterable[ServiceRegistration]) -> tuple[Route, ...]:
    """The routes of ``found``, each service's in its own order."""
    return tuple(r for registration in found for r in registration.routes)

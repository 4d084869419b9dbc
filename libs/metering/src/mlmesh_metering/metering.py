"""Metering in a few lines for any service:

    meter = Metering.from_settings(settings, service=pb.PLATFORM_SERVICE_VECTORS)
    async with meter.admit(key_id, limits, unit="rows", reserve=n,
                           request_id=request.request_id) as call:
        ...  # serve the call
        call.settle(rows_used)
    # on exit: the reservation is settled to what was used and one usage
    # event (key, server-made call id, caller's request id, unit, quantity,
    # status) is queued for the ledger, even on error or cancellation.

    await meter.record(key_id, call_id, request_id, model, "rows", 12)  # by hand

``key_id`` is the verified caller (never a value read from the request).
Each admission makes its own call id (uuid4): the reservation and the usage
event are keyed by it, so a caller reusing a request id can neither merge two
calls into one nor touch another key's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlmesh_chassis.auth import CallAdmission, Principal, peer_target, read_bootstrap_keys
from mlmesh_chassis.config import ServiceSettings
from mlmesh_chassis.database import Database
from mlmesh_chassis.errors import QuotaViolation, ResourceExhausted
from mlmesh_chassis.metrics import REGISTRY
from mlmesh_chassis.registration import SERVICE_KEY_NAME
from prometheus_client import Counter

from mlmesh_metering.batcher import UsageBatcher
from mlmesh_metering.events import REQUEST_ID, UsageEvent, check_request_id
from mlmesh_metering.throttle import Decision, Limits, Throttle

# Per verified key (never a value read from the request): as many series as
# the keys an admin made that hit a limit.
THROTTLED = Counter(
    "mlmesh_throttle_rejections",
    "Calls refused by a key's limit (RESOURCE_EXHAUSTED), by key id and limit.",
    ["key_id", "limit"],
    registry=REGISTRY,
)


class MeteringSettings(ServiceSettings):
    """The settings metering reads; a service's settings class inherits
    them (with its own env prefix, e.g. MLMESH_GATEWAY_REDIS_URL)."""

    # Limits: in-process by default; a Redis URL when replicas share them
    # (redis://host:6379/0). With Redis down, each replica enforces the
    # limits divided by `replicas`.
    redis_url: str = ""
    replicas: int = 1
    # A Redis decision slower than this counts as Redis being down.
    redis_timeout_seconds: float = 0.5
    # Services other than the gateway: where the ledger is (the gateway's
    # UsageService), as host:port or as the path of its port file (read at
    # each send). Events are sent with the service's own key, which needs the
    # scope PLATFORM_SERVICE_USAGE_RECORD.
    usage_target: str = ""
    usage_target_file: Path | None = None
    # Comma-separated key ids whose calls another service bills (the
    # gateway's service key on the llm): an operator's setting, never a
    # caller's. Their calls pass unmetered.
    unmetered_key_ids: str = ""
    # The same by service name ("gateway"): each name's service key id is
    # read from the bootstrap key directory (``bootstrap_keys_file``, where
    # the operator's tooling names a service's key "service <name>"), for
    # deployments whose key ids exist only once the keys are made (Compose's
    # init step). A name the directory lacks is an error at start.
    unmetered_services: str = ""


@dataclass
class MeteredCall:
    """One admitted call. ``settle(used)`` says what it consumed (default 0:
    a call that never settles returns its whole reservation and is billed
    nothing). The other fields end up in its usage event."""

    key_id: str
    call_id: str
    request_id: str
    service: int
    model: str
    unit: str
    reserved: int
    used: int = 0
    version: int = 0
    region: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_items: int = 0
    status: str = "OK"
    started: float = field(default_factory=time.monotonic)

    @property
    def subject(self) -> str:
        return subject(self.key_id)

    def settle(self, used: int) -> None:
        self.used = max(int(used), 0)

    def event(self) -> UsageEvent:
        return UsageEvent(
            key_id=self.key_id,
            call_id=self.call_id,
            request_id=self.request_id,
            service=self.service,
            model=self.model,
            unit=self.unit,
            quantity=self.used,
            version=self.version,
            region=self.region,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            input_items=self.input_items,
            latency_ms=(time.monotonic() - self.started) * 1000,
            status=self.status,
        )


def subject(key_id: str) -> str:
    """The limiter's subject for a key: one per key, so no call of one key
    can reach another's reservations."""
    return f"key:{key_id}"


def new_call_id() -> str:
    return uuid.uuid4().hex


class Metering:
    """The limiter (``throttle``) and the usage sink (``sink``: the ledger in
    the gateway, RecordUsage elsewhere) of one service."""

    def __init__(
        self,
        throttle: Throttle,
        sink: UsageBatcher,
        service: int,
        on_rejection: Callable[[Decision], None] | None = None,
    ) -> None:
        self.throttle = throttle
        self.sink = sink
        self.service = service
        self.on_rejection = on_rejection  # e.g. a service's rejection counter

    @classmethod
    def from_settings(
        cls,
        settings: MeteringSettings,
        *,
        service: int,
        database: Database | None = None,
    ) -> Metering:
        """``database``: the ledger's database (the gateway only); without
        it, events go to ``settings.usage_target`` with RecordUsage."""
        throttle = Throttle(
            settings.redis_url, settings.replicas, redis_timeout_s=settings.redis_timeout_seconds
        )
        sink: UsageBatcher
        target = peer_target(settings.usage_target, settings.usage_target_file)
        if database is not None:
            from mlmesh_metering.ledger import UsageLedger

            sink = UsageLedger(database)
        elif target is not None:
            from mlmesh_metering.remote import RemoteUsageSink

            sink = RemoteUsageSink(target)
        else:
            raise ValueError("metering needs the ledger: set usage_target (the gateway)")
        return cls(throttle, sink, service)

    @contextlib.asynccontextmanager
    async def admit(
        self,
        key_id: str,
        limits: Limits,
        *,
        unit: str = "tokens",
        reserve: int = 0,
        request_id: str = "",
        model: str = "",
        service: int | None = None,
        stream: bool = True,
        call_id: str = "",
    ) -> AsyncIterator[MeteredCall]:
        """Admits one call or raises RESOURCE_EXHAUSTED (QuotaFailure +
        RetryInfo). ``reserve``: units held against the per-minute budget
        until the call settles; ``stream=False``: a unary call (requests per
        minute only). ``request_id`` (the caller's, for tracing) is checked
        here: INVALID_ARGUMENT before anything is reserved."""
        check_request_id(request_id)
        call = MeteredCall(
            key_id=key_id,
            call_id=call_id or new_call_id(),
            request_id=request_id,
            service=self.service if service is None else service,
            model=model,
            unit=unit,
            reserved=max(reserve, 0),
        )
        decision = await self.throttle.admit(
            call.subject, call.call_id, call.reserved, limits, stream
        )
        if not decision.admitted:
            THROTTLED.labels(key_id, decision.violated).inc()
            if self.on_rejection is not None:
                self.on_rejection(decision)
            raise over_limit(key_id, decision)
        try:
            yield call
        except BaseException as error:
            call.status = status_of(error)
            raise
        finally:
            # Settled and recorded once, even when the caller is cancelled.
            await asyncio.shield(self._finish(call, stream))

    async def _finish(self, call: MeteredCall, stream: bool) -> None:
        if stream:
            # Written to Redis before the answer goes out; its reply is not waited for.
            await self.throttle.settle(call.subject, call.call_id, call.used, wait=False)
        await self.sink.record(call.event())

    async def record(
        self,
        key_id: str,
        call_id: str,
        request_id: str,
        model: str,
        unit: str,
        quantity: int,
        **details: Any,
    ) -> None:
        """Queues one usage event by hand (e.g. a call metered outside
        ``admit``); ``details``: other UsageEvent fields (status, service...)."""
        details.setdefault("service", self.service)
        await self.sink.record(
            UsageEvent(
                key_id=key_id,
                call_id=call_id,
                request_id=request_id,
                model=model,
                unit=unit,
                quantity=quantity,
                **details,
            )
        )

    async def close(self) -> None:
        await self.sink.close()
        await self.throttle.close()


def over_limit(key_id: str, decision: Decision) -> ResourceExhausted:
    """The rejection for a throttle decision: QuotaFailure + RetryInfo."""
    return ResourceExhausted(
        f"key {key_id} is over its {decision.violated} limit",
        [QuotaViolation(subject(key_id), decision.violated)],
        decision.retry_after_s,
        key_id=key_id,
        limit=decision.violated,
    )


def status_of(error: BaseException) -> str:
    """A status name for a call that ended with ``error``."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = getattr(error, "code", None)
    if callable(code):  # grpc.RpcError
        with contextlib.suppress(Exception):
            code = code()
    name = getattr(code, "name", None)
    return name if isinstance(name, str) else "INTERNAL"


# The call ``call_admission`` admitted, for the servicer serving it.
current_call: contextvars.ContextVar[MeteredCall | None] = contextvars.ContextVar(
    "current_call", default=None
)


def consumed(unit: str, quantity: int, model: str = "") -> None:
    """Bills the call being served by what it consumed (``quantity`` of
    ``unit``, e.g. 1000 "vectors") instead of one request, in its one usage
    event. Nothing for a call that is not metered."""
    call = current_call.get()
    if call is not None:
        call.unit = unit
        call.model = model or call.model
        call.settle(quantity)


def call_admission(meter: Metering, unmetered: frozenset[str] = frozenset()) -> CallAdmission:
    """Metering for every verified call of a service (``start_service(...,
    admission=...)``): the caller key's requests_per_minute, and one usage
    event per call (unit "requests"), billed to the verified key. Calls of
    the ``unmetered`` key ids (billed by another service) pass as they are."""
    from mlmesh_chassis.context import request_id_var

    @contextlib.asynccontextmanager
    async def admit(principal: Principal, method: str) -> AsyncIterator[object]:
        del method  # usage is per service and key; the ledger has no method column
        if principal.key_id in unmetered:
            yield None
            return
        request_id = request_id_var.get()
        limits = Limits(requests_per_minute=principal.key.limits.requests_per_minute)
        async with meter.admit(
            principal.key_id,
            limits,
            unit="requests",
            stream=False,
            # The caller's x-request-id, for tracing, when it is a valid one.
            request_id=request_id if REQUEST_ID.fullmatch(request_id) else "",
        ) as call:
            call.settle(1)
            token = current_call.set(call)
            try:
                yield call
            finally:
                current_call.reset(token)

    return admit


def metered_calls(
    settings: MeteringSettings, service: int
) -> tuple[CallAdmission | None, Metering | None]:
    """Per-key request limits and one usage event per verified call, for a
    service whose settings name the ledger (``usage_target`` or
    ``usage_target_file``): the admission hook for ``start_service`` and the
    meter to close with the host. Both None for a service run standalone,
    with no ledger to send to."""
    if not (settings.usage_target or settings.usage_target_file):
        return None, None
    meter = Metering.from_settings(settings, service=service)
    return call_admission(meter, unmetered_key_ids(settings)), meter


def unmetered_key_ids(settings: MeteringSettings) -> frozenset[str]:
    """The key ids whose calls pass unmetered: ``unmetered_key_ids`` and the
    service keys of ``unmetered_services`` (from the bootstrap directory)."""
    ids = {i for i in settings.unmetered_key_ids.split(",") if i}
    names = [n.strip() for n in settings.unmetered_services.split(",") if n.strip()]
    if not names:
        return frozenset(ids)
    if settings.bootstrap_keys_file is None:
        raise ValueError("unmetered_services needs bootstrap_keys_file (the key directory)")
    by_name = {
        entry.key.display_name: entry.key.id
        for entry in read_bootstrap_keys(settings.bootstrap_keys_file)
    }
    for name in names:
        key_id = by_name.get(SERVICE_KEY_NAME.format(name))
        if not key_id:
            raise ValueError(f"unmetered service {name[:40]!r} has no key in the bootstrap keys")
        ids.add(key_id)
    return frozenset(ids)

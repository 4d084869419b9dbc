"""Admission: everything a model call goes through around its work, the
same for Generate, Infer and Embed.

``async with admission(key, service, model, reserve=..., request_id=...) as call``:

1. the key's token quota for the period, read from the usage ledger (token
   services only; RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo);
2. the per-minute throttle (requests; tokens reserved for streams);
3. on the way out, however the call ends (error, cancel): ``call`` is
   settled to what it says it used (tokens: ``prompt_tokens +
   completion_tokens``; items: ``input_items``), its status recorded, its
   usage event queued for the ledger once, and the request metric counted.

The handler only fills in ``call`` (counts, version, region).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.errors import QuotaViolation, ResourceExhausted
from mlmesh_metering import Limits, MeteredCall, Metering
from mlmesh_metering.ledger import UsageLedger
from mlmesh_metering.metering import THROTTLED

from mlmesh_gateway.telemetry import REJECTIONS, REQUESTS, TOKENS, annotate


@dataclass(frozen=True)
class Metered:
    """How a service's calls are metered."""

    name: str  # the metric's service label
    unit: str  # "tokens" or "items"
    stream: bool  # a stream holds a reservation; a unary call counts requests only


METERED: dict[int, Metered] = {
    pb.PLATFORM_SERVICE_GENERATE: Metered("generate", "tokens", True),
    pb.PLATFORM_SERVICE_INFER: Metered("infer", "items", False),
    pb.PLATFORM_SERVICE_EMBED: Metered("embed", "tokens", False),
}


def limits_of(key: pb.Key) -> Limits:
    return Limits(
        key.limits.tokens_per_minute,
        key.limits.requests_per_minute,
        key.limits.max_concurrent_streams,
    )


class Admission:
    def __init__(self, meter: Metering) -> None:
        # The gateway is the ledger's writer: quotas read it.
        assert isinstance(meter.sink, UsageLedger), "the gateway meters into the ledger"
        self.meter = meter
        self.ledger: UsageLedger = meter.sink

    @contextlib.asynccontextmanager
    async def __call__(
        self, key: pb.Key, service: int, model: str, *, reserve: int = 0, request_id: str = ""
    ) -> AsyncIterator[MeteredCall]:
        metered = METERED[service]
        if metered.unit == "tokens":
            await self._check_quota(key, reserve)
        admitted: MeteredCall | None = None
        try:
            async with self.meter.admit(
                key.id,
                limits_of(key),
                unit=metered.unit,
                reserve=reserve,
                request_id=request_id,
                model=model,
                service=service,
                stream=metered.stream,
            ) as call:
                admitted = call
                # The caller's own id gets a name of its own: mlmesh.request_id
                # is the chassis' (x-request-id), which traces are found by.
                annotate(
                    **{
                        "mlmesh.model": model,
                        "mlmesh.key_id": key.id,
                        "mlmesh.client_request_id": request_id or None,
                        "mlmesh.call_id": call.call_id,
                    }
                )
                try:
                    yield call
                finally:
                    call.settle(_used(call))
        finally:
            if admitted is not None:  # its status is set once the meter has seen the error
                _observe(metered.name, admitted)

    async def _check_quota(self, key: pb.Key, reserve: int) -> None:
        """The key's token quota per period, read from the usage ledger. Soft by
        at most what is in flight: streams still running are not in the ledger
        yet (the per-minute limits bound that)."""
        quota = key.limits.token_quota
        if quota <= 0:
            return
        start, end = period(key.limits.token_quota_period, dt.datetime.now(dt.UTC))
        used = await self.ledger.tokens_since(key.id, start)
        if used + reserve > quota:
            REJECTIONS.labels("token_quota").inc()
            THROTTLED.labels(key.id, "token_quota").inc()
            raise ResourceExhausted(
                f"key {key.id} used {used} of its {quota} tokens this period",
                [QuotaViolation(f"key:{key.id}", "token_quota")],
                (end - dt.datetime.now(dt.UTC)).total_seconds(),
                key_id=key.id,
                used=used,
                quota=quota,
            )


def _used(call: MeteredCall) -> int:
    if call.unit == "tokens":
        return call.prompt_tokens + call.completion_tokens
    return call.input_items


def _observe(service: str, call: MeteredCall) -> None:
    REQUESTS.labels(service, call.model, call.status).inc()
    if call.unit == "tokens":
        TOKENS.labels(call.model, "input").inc(call.prompt_tokens)
        TOKENS.labels(call.model, "output").inc(call.completion_tokens)
    annotate(
        **{
            "gen_ai.usage.input_tokens": call.prompt_tokens,
            "gen_ai.usage.output_tokens": call.completion_tokens,
            "mlmesh.input_items": call.input_items,
            "gen_ai.response.model": f"{call.model}/{call.version}",
            "server.address": call.region or None,
        }
    )


def period(kind: int, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The current quota period (UTC): day (default), week (from Monday), month."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == pb.QUOTA_PERIOD_WEEK:
        start = day - dt.timedelta(days=day.weekday())
        return start, start + dt.timedelta(days=7)
    if kind == pb.QUOTA_PERIOD_MONTH:
        start = day.replace(day=1)
        return start, (start + dt.timedelta(days=32)).replace(day=1)
    return day, day + dt.timedelta(days=1)

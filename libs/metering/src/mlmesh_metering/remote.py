"""The ledger as a service other than the gateway reaches it: batches of
usage events sent with UsageService.RecordUsage (idempotent by event id)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from mlmesh.gateway.v1 import usage_service_pb2, usage_service_pb2_grpc
from mlmesh_chassis.errors import Unavailable

from mlmesh_metering.batcher import UsageBatcher
from mlmesh_metering.events import UsageEvent

# Codes that mean "not now" (the event may well be fine): keep and retry.
# A key without the USAGE_RECORD scope is a deployment mistake to fix, not a
# reason to drop usage, so it is retried (and logged) too.
_RETRY = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
MAX_EVENTS = 1000  # RecordUsage's batch limit (usage_service.proto)


def to_message(event: UsageEvent) -> usage_service_pb2.MeteredEvent:
    message = usage_service_pb2.MeteredEvent(
        event_id=event.event_id,
        key_id=event.key_id,
        call_id=event.call_id,
        request_id=event.request_id,
        service=event.service,  # type: ignore[arg-type]
        model=event.model,
        unit=event.unit,
        quantity=event.quantity,
        status=event.status,
    )
    message.latency.FromNanoseconds(int(event.latency_ms * 1e6))
    return message


def from_message(message: usage_service_pb2.MeteredEvent) -> UsageEvent:
    return UsageEvent(
        event_id=message.event_id,
        key_id=message.key_id,
        call_id=message.call_id,
        request_id=message.request_id,
        service=int(message.service),
        model=message.model,
        unit=message.unit,
        quantity=message.quantity,
        input_items=0,
        status=message.status or "OK",
        latency_ms=message.latency.ToNanoseconds() / 1e6,
    )


class RemoteUsageSink(UsageBatcher):
    """Sends batches to the gateway's UsageService.RecordUsage, with this
    service's own key (``api_key`` only where a process has none, e.g. a
    test): it needs PLATFORM_SERVICE_USAGE_RECORD."""

    name = "remote"

    def __init__(
        self,
        target: str | Callable[[], str | None],
        api_key: str = "",
        flush_s: float = 0.25,
        batch: int = MAX_EVENTS,
        timeout_s: float = 5.0,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        # Retries at most 2 s apart: the gateway being away (a restart, or not
        # started yet) should delay usage by seconds, not half a minute.
        super().__init__(flush_s, min(batch, MAX_EVENTS), max_backoff_s=2.0)
        # The gateway's address may be known only later (a port file the
        # runner writes when it starts): the channel opens at the first send.
        self._target = (lambda: target) if isinstance(target, str) else target
        self._api_key = api_key
        self._channel = channel
        self.timeout_s = timeout_s

    def _stub(self) -> usage_service_pb2_grpc.UsageServiceStub:
        if self._channel is None:
            target = self._target()
            if not target:
                raise Unavailable("the ledger's address is not known yet")
            from mlmesh_chassis.channels import FAST_RECONNECT_OPTIONS
            from mlmesh_sdk.channel import mesh_channel

            self._channel = mesh_channel(target, self._api_key, FAST_RECONNECT_OPTIONS)
        return usage_service_pb2_grpc.UsageServiceStub(self._channel)

    async def _write(self, events: list[UsageEvent]) -> None:
        request = usage_service_pb2.RecordUsageRequest(events=[to_message(e) for e in events])
        stub = self._stub()
        try:
            await stub.RecordUsage(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                # A new channel next time: it re-reads the address (the gateway
                # may have moved) and skips grpc's own reconnect backoff.
                channel, self._channel = self._channel, None
                if channel is not None:
                    await channel.close()
            if code in _RETRY:
                raise Unavailable(
                    f"RecordUsage failed ({code.name}): {error.details()}",  # type: ignore[attr-defined]
                    code=code.name,
                ) from error
            raise  # INVALID_ARGUMENT: the batch is retried event by event

    async def close(self) -> None:
        await super().close()
        if self._channel is not None:
            await self._channel.close()

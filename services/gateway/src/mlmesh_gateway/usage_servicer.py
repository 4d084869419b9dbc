"""UsageService: the ledger's totals (GetUsage) and the usage other services
metered (RecordUsage), into the one ledger the gateway writes."""

from __future__ import annotations

import datetime as dt

from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import usage_service_pb2, usage_service_pb2_grpc
from mlmesh_chassis.errors import FieldViolation, InvalidArgument
from mlmesh_chassis.pagination import offset_page
from mlmesh_metering.ledger import UsageLedger
from mlmesh_metering.remote import MAX_EVENTS, from_message


class UsageServicer(usage_service_pb2_grpc.UsageServiceServicer):
    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger

    async def GetUsage(self, request, context):  # type: ignore[no-untyped-def]
        if not request.HasField("start_time") or not request.HasField("end_time"):
            raise InvalidArgument.field("start_time", "start_time and end_time are required")
        start = request.start_time.ToDatetime(tzinfo=dt.UTC)
        end = request.end_time.ToDatetime(tzinfo=dt.UTC)
        if end <= start:
            raise InvalidArgument.field("end_time", "must be after start_time")
        buckets = await self.ledger.buckets(
            start, end, list(request.key_ids), list(request.models), request.granularity
        )
        page, token = offset_page(buckets, request.page_size, request.page_token)
        return usage_service_pb2.GetUsageResponse(buckets=page, next_page_token=token)

    async def RecordUsage(self, request, context):  # type: ignore[no-untyped-def]
        """Usage other services metered, into the one ledger. All or nothing:
        one bad field rejects the batch (BadRequest names each); written
        before the reply (a retry of an answered batch writes nothing twice:
        insert-or-ignore on the event id). The chassis has checked the
        caller's USAGE_RECORD scope."""
        if not 1 <= len(request.events) <= MAX_EVENTS:
            raise InvalidArgument.field("events", f"1 to {MAX_EVENTS} events")
        events = [from_message(message) for message in request.events]
        violations: list[FieldViolation] = []
        known = set(pb.PlatformService.values()) - {pb.PLATFORM_SERVICE_UNSPECIFIED}
        for i, (message, event) in enumerate(zip(request.events, events, strict=True)):
            violations += event.violations(f"events[{i}].")
            if message.service not in known:
                violations.append(FieldViolation(f"events[{i}].service", "a PlatformService"))
        if violations:
            raise InvalidArgument(
                f"{len(violations)} invalid fields in {len(events)} usage events",
                violations[:100],
                invalid_fields=len(violations),
                events=len(events),
            )
        for event in events:
            await self.ledger.record(event)
        await self.ledger.flush()  # durable before the reply: Unavailable otherwise
        return usage_service_pb2.RecordUsageResponse(accepted_count=len(events))

"""UsageService: the ledger's totals (GetUsage) and the usage other services
metered (RecordUsage), into the one ledger the gateway writes."""

from __future__ import annotations

import datetime as dt

from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import usage_service_pb2, usage_service_pb2_grpc
from mlmesh_chassis.auth import authorize, current_principal
from mlmesh_chassis.errors import FieldViolation, InvalidArgument
from mlmesh_chassis.pagination import offset_page
from mlmesh_metering.ledger import UsageLedger
from mlmesh_metering.remote import MAX_EVENTS, from_message

# GetUsage: buckets per page unless asked (the contract's default; at most
# mlmesh_chassis.pagination.MAX_PAGE_SIZE), and keys per request.
DEFAULT_PAGE_SIZE = 100
MAX_KEY_IDS = 100
MAX_KEY_ID_LENGTH = 64


class UsageServicer(usage_service_pb2_grpc.UsageServiceServicer):
    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger

    async def GetUsage(self, request, context):  # type: ignore[no-untyped-def]
        """The buckets of the caller's own key (``key_ids`` empty), or of the
        keys named (other keys than the caller's need ADMIN), from
        ``start_time`` to ``end_time`` (unset: now)."""
        caller = current_principal().key
        key_ids = list(dict.fromkeys(request.key_ids)) or [caller.id]
        if len(key_ids) > MAX_KEY_IDS or any(len(k) > MAX_KEY_ID_LENGTH for k in key_ids):
            raise InvalidArgument.field(
                "key_ids", f"at most {MAX_KEY_IDS} keys of at most {MAX_KEY_ID_LENGTH} characters"
            )
        if key_ids != [caller.id]:
            authorize(caller, pb.PLATFORM_SERVICE_ADMIN)
        if not request.HasField("start_time"):
            raise InvalidArgument.field("start_time", "is required")
        start = request.start_time.ToDatetime(tzinfo=dt.UTC)
        end = (
            request.end_time.ToDatetime(tzinfo=dt.UTC)
            if request.HasField("end_time")
            else dt.datetime.now(dt.UTC)
        )
        if end <= start:
            raise InvalidArgument.field("end_time", "must be after start_time")
        buckets = await self.ledger.buckets(
            start, end, key_ids, list(request.models), request.granularity
        )
        page, token = offset_page(
            buckets, request.page_size or DEFAULT_PAGE_SIZE, request.page_token
        )
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

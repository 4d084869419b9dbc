"""UsageService: the ledger's totals (GetUsage) and the usage other services
metered (RecordUsage), into the one ledger the gateway writes."""

from __future__ import annotations

import datetime as dt

from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import usage_service_pb2, usage_service_pb2_grpc
from mlmesh_chassis.auth import authorize, current_principal
from mlmesh_chassis.errors import InvalidArgument
from mlmesh_chassis.pagination import offset_page
from mlmesh_metering.ledger import UsageLedger
from mlmesh_metering.remote import from_message

# GetUsage: buckets per page unless asked (the contract's default; at most
# mlmesh_chassis.pagination.MAX_PAGE_SIZE).
DEFAULT_PAGE_SIZE = 100


class UsageServicer(usage_service_pb2_grpc.UsageServiceServicer):
    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger

    async def GetUsage(self, request, context):  # type: ignore[no-untyped-def]
        """The buckets of the caller's own key (``key_ids`` empty), or of the
        keys named (other keys than the caller's need ADMIN), from
        ``start_time`` to ``end_time`` (unset: now)."""
        caller = current_principal().key
        # The contract's rules (checked by the chassis) bound key_ids and
        # models and make start_time required.
        key_ids = list(dict.fromkeys(request.key_ids)) or [caller.id]
        if key_ids != [caller.id]:
            authorize(caller, pb.PLATFORM_SERVICE_ADMIN)
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
        the chassis has checked the caller's USAGE_RECORD scope and every
        event against the contract's rules (one bad field rejects the batch,
        BadRequest naming each); written before the reply (a retry of an
        answered batch writes nothing twice: insert-or-ignore on the event
        id)."""
        events = [from_message(message) for message in request.events]
        for event in events:
            await self.ledger.record(event)
        await self.ledger.flush()  # durable before the reply: Unavailable otherwise
        return usage_service_pb2.RecordUsageResponse(accepted_count=len(events))

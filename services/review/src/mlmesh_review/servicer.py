"""ReviewService: the RPCs over the queue (proto <-> domain; errors are the
chassis' domain errors, mapped to statuses in one place)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh.review.v1 import review_pb2 as pb
from mlmesh.review.v1 import review_service_pb2 as rpc
from mlmesh.review.v1 import review_service_pb2_grpc
from mlmesh_chassis.auth import authorize, current_principal
from mlmesh_chassis.errors import FieldViolation, InvalidArgument
from mlmesh_sdk.registry import RegistryClient

from mlmesh_review import export
from mlmesh_review.convert import SOURCE_NAMES, STATE_NAMES, VERDICT_NAMES, draft_of, to_proto
from mlmesh_review.queue import MAX_EXPORT_ITEMS, Draft, Filters, ReviewQueue, item_id_of, now_us

# Who may report a prediction: a user of the models (the route says the same;
# checked again here with the model, against the key's model patterns).
REPORTER_SCOPES = (S.PLATFORM_SERVICE_GENERATE, S.PLATFORM_SERVICE_INFER, S.PLATFORM_SERVICE_EMBED)


class ReviewServicer(review_service_pb2_grpc.ReviewServiceServicer):
    def __init__(
        self,
        queue: ReviewQueue,
        registry: RegistryClient,
        scratch: Path,
        default_lease_s: float,
    ) -> None:
        self.queue = queue
        self.registry = registry
        self.scratch = scratch
        self.default_lease_s = default_lease_s

    async def SubmitItems(self, request, context):  # type: ignore[no-untyped-def]
        submitter = current_principal().key_id
        # A user report's source id names its reporter (the verified key):
        # only ReportPrediction makes them, or a source could take a user's
        # report in advance (the same source id is one item).
        reports = [
            FieldViolation(f"items[{i}].source", "USER_REPORT items come from ReportPrediction")
            for i, item in enumerate(request.items)
            if item.source == pb.ITEM_SOURCE_USER_REPORT
        ]
        if reports:
            raise InvalidArgument.listing(reports, 5)
        rows, created = await self.queue.submit([draft_of(i) for i in request.items], submitter)
        now = now_us()
        return rpc.SubmitItemsResponse(
            items=[to_proto(r, now) for r in rows], created_count=created
        )

    async def ReportPrediction(self, request, context):  # type: ignore[no-untyped-def]
        principal = current_principal()
        authorize(principal.key, REPORTER_SCOPES, model=request.model)
        # The reporter is the verified key, never a field: its id scopes the
        # report (one item per key and request id).
        reporter = principal.key_id
        draft = Draft(
            source="USER_REPORT",
            source_id=f"{reporter}/{request.request_id}",
            model=request.model,
            inputs=request.inputs,
            primary_output=request.output,
            alternative_output=request.reason,
            context={"suggested_label": request.suggested_label} if request.suggested_label else {},
            request_id=request.request_id,
        )
        await self.queue.check_reporter(reporter)
        rows, _ = await self.queue.submit([draft], reporter)
        return rpc.ReportPredictionResponse(item=to_proto(rows[0], now_us()))

    async def ListItems(self, request, context):  # type: ignore[no-untyped-def]
        filters = Filters(
            state=STATE_NAMES.get(request.state, ""),
            source=SOURCE_NAMES.get(request.source, ""),
            model=request.model,
        )
        rows, token = await self.queue.page(filters, request.page_size, request.page_token)
        now = now_us()
        return rpc.ListItemsResponse(items=[to_proto(r, now) for r in rows], next_page_token=token)

    async def GetItem(self, request, context):  # type: ignore[no-untyped-def]
        row = await self.queue.get(item_id_of(request.name))
        return rpc.GetItemResponse(item=to_proto(row, now_us()))

    async def ClaimItem(self, request, context):  # type: ignore[no-untyped-def]
        lease_s = (
            request.lease_duration.ToTimedelta().total_seconds()
            if request.HasField("lease_duration")
            else self.default_lease_s
        )
        row = await self.queue.claim(item_id_of(request.name), current_principal().key_id, lease_s)
        return rpc.ClaimItemResponse(item=to_proto(row, now_us()))

    async def SubmitVerdict(self, request, context):  # type: ignore[no-untyped-def]
        row = await self.queue.decide(
            item_id_of(request.name),
            current_principal().key_id,
            VERDICT_NAMES[request.verdict],
            request.correct_label,
            request.note,
        )
        return rpc.SubmitVerdictResponse(item=to_proto(row, now_us()))

    async def EscalateItem(self, request, context):  # type: ignore[no-untyped-def]
        row = await self.queue.escalate(
            item_id_of(request.name), current_principal().key_id, request.reason
        )
        return rpc.EscalateItemResponse(item=to_proto(row, now_us()))

    async def ExportDataset(self, request, context):  # type: ignore[no-untyped-def]
        sources = sorted({SOURCE_NAMES[s] for s in request.sources})
        after_us = (
            request.decided_after.ToMicroseconds() if request.HasField("decided_after") else 0
        )
        limit = min(request.max_items or MAX_EXPORT_ITEMS, MAX_EXPORT_ITEMS)
        query: dict[str, Any] = {
            "model": request.model,
            "state": "DECIDED",
            "sources": sources,
            "decided_after": request.decided_after.ToJsonString()
            if request.HasField("decided_after")
            else "",
            "max_items": limit,
            "order": "decide_time, item",
        }
        done = await export.export(
            self.queue.decided_pages(request.model, sources, after_us, limit),
            request.model,
            query,
            current_principal().key_id,
            self.registry,
            self.scratch,
        )
        return rpc.ExportDatasetResponse(
            dataset=done.dataset,
            version=done.version,
            item_count=done.item_count,
            sha256=done.sha256,
            size_bytes=done.size_bytes,
        )

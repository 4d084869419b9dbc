"""MonitorService: the RPCs over the store and its analysis (thin: proto <->
domain; domain errors become statuses in the chassis)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

from google.protobuf import duration_pb2
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_MONITOR
from mlmesh.monitor.v1 import monitor_pb2 as pb
from mlmesh.monitor.v1 import monitor_service_pb2 as rpc
from mlmesh.monitor.v1 import monitor_service_pb2_grpc
from mlmesh_chassis.auth import authorize, current_principal
from mlmesh_chassis.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied

from mlmesh_monitor import drift as drift_math
from mlmesh_monitor.analysis import Analysis
from mlmesh_monitor.quality import Figures
from mlmesh_monitor.store import LISTED_UNKNOWN, MonitorStore
from mlmesh_monitor.telemetry import (
    FEEDBACK,
    FEEDBACK_UNKNOWN,
    PREDICTIONS_DUPLICATE,
    PREDICTIONS_LOGGED,
)

SHOWN_VIOLATIONS = 5


def _distinct(ids: list[str], field: str) -> None:
    """INVALID_ARGUMENT naming each repeated request id's field."""
    seen: set[str] = set()
    violations = []
    for i, request_id in enumerate(ids):
        if request_id in seen:
            violations.append(FieldViolation(f"{field}[{i}].request_id", "repeats an earlier id"))
        seen.add(request_id)
    if violations:
        raise InvalidArgument.listing(violations, SHOWN_VIOLATIONS)


def _may_use(model: str) -> None:
    """PERMISSION_DENIED unless the caller's key may use ``model`` (its
    model patterns): a key reads and writes only its own models' figures,
    references and labels."""
    authorize(current_principal().key, PLATFORM_SERVICE_MONITOR, model=model)


def _model_filter() -> Callable[[str], bool]:
    """Whether the caller's key may use a model (checked per prediction)."""
    key = current_principal().key
    authorize(key, PLATFORM_SERVICE_MONITOR)

    def allowed(model: str) -> bool:
        try:
            authorize(key, PLATFORM_SERVICE_MONITOR, model=model)
        except PermissionDenied:
            return False
        return True

    return allowed


def _duration(ms: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(dt.timedelta(milliseconds=ms))
    return out


def _figures(f: Figures) -> pb.QualityFigures:
    out = pb.QualityFigures(
        request_count=f.request_count,
        error_rate=f.error_rate,
        latency_p50=_duration(f.latency_p50_ms),
        latency_p99=_duration(f.latency_p99_ms),
        labelled_count=f.labelled_count,
        accuracy=f.accuracy,
        macro_precision=f.macro_precision,
        macro_recall=f.macro_recall,
        classes=[
            pb.ClassQuality(
                label=c.label,
                support=c.support,
                predicted=c.predicted,
                precision=c.precision,
                recall=c.recall,
            )
            for c in f.classes
        ],
        classes_omitted=f.classes_omitted,
    )
    out.start_time.FromDatetime(f.start)
    out.end_time.FromDatetime(f.end)
    return out


class MonitorServicer(monitor_service_pb2_grpc.MonitorServiceServicer):
    def __init__(self, store: MonitorStore, analysis: Analysis) -> None:
        self.store = store
        self.analysis = analysis

    async def LogPredictions(self, request, context):  # type: ignore[no-untyped-def]
        _distinct([p.request_id for p in request.predictions], "predictions")
        stored, duplicates = await self.store.log(list(request.predictions))
        for p in stored:
            PREDICTIONS_LOGGED.labels(p.model).inc()
        PREDICTIONS_DUPLICATE.inc(duplicates)
        return rpc.LogPredictionsResponse(stored_count=len(stored), duplicate_count=duplicates)

    async def RecordFeedback(self, request, context):  # type: ignore[no-untyped-def]
        _distinct([f.request_id for f in request.feedback], "feedback")
        # Only predictions of models the key may use are labelled; the others
        # are answered as unknown ids (nothing tells they exist).
        outcome = await self.store.feedback(list(request.feedback), _model_filter())
        for name, count in (
            ("recorded", outcome.recorded),
            ("unchanged", outcome.unchanged),
            ("updated", outcome.updated),
            ("unknown", len(outcome.unknown)),
        ):
            if count:
                FEEDBACK.labels(name).inc(count)
        FEEDBACK_UNKNOWN.inc(len(outcome.unknown))
        return rpc.RecordFeedbackResponse(
            recorded_count=outcome.recorded,
            unchanged_count=outcome.unchanged,
            updated_count=outcome.updated,
            unknown_count=len(outcome.unknown),
            unknown_request_ids=outcome.unknown[:LISTED_UNKNOWN],
        )

    async def GetModelQuality(self, request, context):  # type: ignore[no-untyped-def]
        _may_use(request.model)
        bucket = request.bucket.ToTimedelta() if request.HasField("bucket") else None
        start, end, versions = await self.analysis.quality(
            request.model, request.version, request.window.ToTimedelta(), bucket
        )
        response = rpc.GetModelQualityResponse(
            model=request.model,
            versions=[
                pb.VersionQuality(
                    version=v.version,
                    overall=_figures(v.overall),
                    buckets=[_figures(b) for b in v.buckets],
                )
                for v in versions
            ],
            unknown_feedback_count=await self.store.unknown_feedback(),
        )
        response.start_time.FromDatetime(start)
        response.end_time.FromDatetime(end)
        return response

    async def SetDriftReference(self, request, context):  # type: ignore[no-untyped-def]
        _may_use(request.reference.model)
        # Up to 4096 features of 100 edges (~6 MB): checked off the loop.
        reference = await asyncio.to_thread(drift_math.normalized, request.reference)
        stored = await self.store.set_reference(reference)
        return rpc.SetDriftReferenceResponse(reference=stored)

    async def GetDriftReference(self, request, context):  # type: ignore[no-untyped-def]
        _may_use(request.model)
        reference = await self.store.reference(request.model, request.version)
        if reference is None:
            raise NotFound(
                "drift reference",
                f"{request.model}/{request.version}",
                f"no drift reference for {request.model!r} version {request.version}",
            )
        return rpc.GetDriftReferenceResponse(reference=reference)

    async def GetDrift(self, request, context):  # type: ignore[no-untyped-def]
        _may_use(request.model)
        reference, start, end, rows, worst, features = await self.analysis.drift(
            request.model, request.version, request.window.ToTimedelta(), request.max_rows
        )
        response = rpc.GetDriftResponse(
            reference=reference, row_count=rows, status=worst, features=features
        )
        response.start_time.FromDatetime(start)
        response.end_time.FromDatetime(end)
        return response

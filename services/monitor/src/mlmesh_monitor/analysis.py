"""The monitor's reads over the store: quality figures and drift for a
window, their heavy parts (thousands of rows) in a worker thread."""

from __future__ import annotations

import asyncio
import datetime as dt

from mlmesh.monitor.v1 import monitor_pb2 as pb
from mlmesh_chassis.errors import FieldViolation, InvalidArgument, NotFound

from mlmesh_monitor import drift as drift_math
from mlmesh_monitor import quality
from mlmesh_monitor.config import MonitorSettings
from mlmesh_monitor.store import MonitorStore

MAX_BUCKETS = 200


class Analysis:
    def __init__(self, store: MonitorStore, settings: MonitorSettings) -> None:
        self.store = store
        self.settings = settings

    async def quality(
        self,
        model: str,
        version: int,
        window: dt.timedelta,
        bucket: dt.timedelta | None,
        now: dt.datetime | None = None,
    ) -> tuple[dt.datetime, dt.datetime, list[quality.VersionFigures]]:
        end = now or dt.datetime.now(dt.UTC)
        start = end - window
        if bucket is not None and window / bucket > MAX_BUCKETS:
            raise InvalidArgument(
                f"window / bucket is more than {MAX_BUCKETS} buckets",
                [FieldViolation("bucket", f"at most {MAX_BUCKETS} buckets per window")],
                max_buckets=MAX_BUCKETS,
            )
        rows = await self.store.quality_rows(
            model, version, start, end, self.settings.quality_max_rows
        )
        figures = await asyncio.to_thread(quality.by_version, rows, start, end, bucket)
        return start, end, figures

    async def drift(
        self, model: str, version: int, window: dt.timedelta, max_rows: int
    ) -> tuple[pb.DriftReference, dt.datetime, dt.datetime, int, int, list[pb.FeatureDrift]]:
        reference = await self.store.reference(model, version)
        if reference is None:
            raise NotFound(
                "drift reference",
                f"{model}/{version}",
                f"no drift reference for {model!r} version {version} (nor the model's default)",
            )
        limit = min(max_rows or self.settings.drift_max_rows, self.settings.drift_max_rows)
        end = dt.datetime.now(dt.UTC)
        start = end - window
        width = max(f.index for f in reference.features) + 1
        blobs = await self.store.feature_rows(model, version, start, end, limit, width)
        rows, worst, features = await asyncio.to_thread(
            drift_math.drift, reference, blobs, self.settings.drift_min_rows
        )
        return reference, start, end, rows, worst, features

"""GaugeRefresher: recomputes the exported quality and drift gauges for the
model versions seen in the metrics window, every ``metrics_refresh_seconds``
(never per request), and deletes predictions past their retention."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from mlmesh_chassis.errors import MlmeshError

from mlmesh_monitor.analysis import Analysis
from mlmesh_monitor.config import MonitorSettings
from mlmesh_monitor.review import LowConfidenceReview
from mlmesh_monitor.store import MonitorStore
from mlmesh_monitor.telemetry import (
    ACCURACY,
    DRIFT_STATUS,
    LABELLED,
    PRECISION,
    PSI,
    RECALL,
    REFRESH_FAILURES,
    WINDOW_ERROR_RATE,
    WINDOW_REQUESTS,
)

log = logging.getLogger("mlmesh.monitor")
# Drift status gauge values (the DriftStatus enum less one: 0 insufficient
# data, 1 ok, 2 warn, 3 alert).
STATUS_VALUE = {1: 1, 2: 2, 3: 3, 4: 0}


class GaugeRefresher:
    def __init__(
        self,
        store: MonitorStore,
        analysis: Analysis,
        settings: MonitorSettings,
        review: LowConfidenceReview | None = None,
    ) -> None:
        self.store = store
        self.analysis = analysis
        self.settings = settings
        self.review = review

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except (MlmeshError, OSError, ValueError) as error:
                REFRESH_FAILURES.inc()
                log.warning("gauge refresh failed: %s", error)
            if self.review is not None:
                try:
                    await self.review.check()
                except Exception as error:  # the queue is down: try at the next refresh
                    log.warning("low-confidence review submission failed: %s", error)
            await asyncio.sleep(self.settings.metrics_refresh_seconds)

    async def refresh(self) -> None:
        window = dt.timedelta(seconds=self.settings.metrics_window_seconds)
        now = dt.datetime.now(dt.UTC)
        if self.settings.retention_days:
            await self.store.prune(now - dt.timedelta(days=self.settings.retention_days))
        pairs = await self.store.recent_versions(now - window)
        quality: dict[tuple[str, str], tuple[float, ...]] = {}
        for model in sorted({m for m, _ in pairs}):
            _, _, versions = await self.analysis.quality(model, 0, window, None, now)
            for v in versions:
                o = v.overall
                quality[(model, str(v.version))] = (
                    o.accuracy,
                    o.macro_precision,
                    o.macro_recall,
                    o.labelled_count,
                    o.request_count,
                    o.error_rate,
                )
        drift: dict[tuple[str, str], tuple[int, list[tuple[str, float]]]] = {}
        for model, version in pairs:
            if version <= 0 or await self.store.reference(model, version) is None:
                continue
            _, _, _, _, worst, features = await self.analysis.drift(model, version, window, 0)
            drift[(model, str(version))] = (
                STATUS_VALUE.get(int(worst), 0),
                [(f.name or str(f.index), f.psi) for f in features],
            )
        # Swap the values in at once: versions gone from the window disappear.
        for gauge in (ACCURACY, PRECISION, RECALL, LABELLED, WINDOW_REQUESTS, WINDOW_ERROR_RATE):
            gauge.clear()
        for labels, (acc, prec, rec, labelled, requests, errors) in quality.items():
            WINDOW_REQUESTS.labels(*labels).set(requests)
            WINDOW_ERROR_RATE.labels(*labels).set(errors)
            LABELLED.labels(*labels).set(labelled)
            if labelled:  # no accuracy without feedback: no series
                ACCURACY.labels(*labels).set(acc)
                PRECISION.labels(*labels).set(prec)
                RECALL.labels(*labels).set(rec)
        PSI.clear()
        DRIFT_STATUS.clear()
        for labels, (status, psis) in drift.items():
            DRIFT_STATUS.labels(*labels).set(status)
            if status:
                for name, value in psis:
                    PSI.labels(*labels, name).set(value)

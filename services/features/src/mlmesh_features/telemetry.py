"""The feature store's SLO figures on /metrics: online read latency per view
(a histogram, for p99) and freshness, the event time of the newest value
written per view (``time() - mlmesh_features_newest_event_timestamp_seconds``
in PromQL). Views are an admin's definitions, so their names bound the
series; nothing is labelled by a caller's value."""

from __future__ import annotations

from mlmesh_chassis.metrics import REGISTRY
from prometheus_client import Gauge, Histogram

ONLINE_READ_SECONDS = Histogram(
    "mlmesh_features_online_read_seconds",
    "One view's read from the online store for GetOnlineFeatures (one round trip).",
    ["view"],
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
NEWEST_EVENT = Gauge(
    "mlmesh_features_newest_event_timestamp_seconds",
    "Event time (Unix seconds) of the newest value written to the online store, per view "
    "(source_kind: stream views are expected to stay fresh; batch ones move on materialize).",
    ["view", "source_kind"],
    registry=REGISTRY,
)
STEP = Gauge(
    "mlmesh_features_view_step_seconds",
    "A windowed view's step (how often a new value is due; 0: not windowed), "
    "so freshness alerts allow for it.",
    ["view"],
    registry=REGISTRY,
)
_newest: dict[tuple[str, str], float] = {}


def written(view: str, source_kind: str, newest_event_s: float, step_s: float = 0.0) -> None:
    """A write of rows up to ``newest_event_s``: freshness never moves back
    (a file read late, a backfill of older rows). Called on the store's one
    writing thread."""
    labels = (view, source_kind)
    STEP.labels(view).set(step_s)
    if newest_event_s > _newest.get(labels, float("-inf")):
        _newest[labels] = newest_event_s
        NEWEST_EVENT.labels(view, source_kind).set(newest_event_s)

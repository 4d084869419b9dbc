"""The monitor's metrics (Prometheus, on the service's /metrics). Counters
move per call; the quality and drift gauges are recomputed periodically
(``gauges.GaugeRefresher``), never per request."""

from __future__ import annotations

from mlmesh_chassis.metrics import REGISTRY
from prometheus_client import Counter, Gauge

PREDICTIONS_LOGGED = Counter(
    "mlmesh_monitor_predictions_logged",
    "Predictions stored (duplicates of a stored request id are not counted).",
    ["model"],
    registry=REGISTRY,
)
PREDICTIONS_DUPLICATE = Counter(
    "mlmesh_monitor_predictions_duplicate",
    "Predictions whose request id was stored before (left unchanged).",
    registry=REGISTRY,
)
FEEDBACK = Counter(
    "mlmesh_monitor_feedback",
    "Feedback items by outcome (recorded, unchanged, updated, unknown).",
    ["outcome"],
    registry=REGISTRY,
)
FEEDBACK_UNKNOWN = Counter(
    "mlmesh_monitor_feedback_unknown_ids",
    "Feedback for request ids with no logged prediction.",
    registry=REGISTRY,
)
ACCURACY = Gauge(
    "mlmesh_monitor_accuracy",
    "Share of labelled predictions that were right, over the metrics window.",
    ["model", "version"],
    registry=REGISTRY,
)
PRECISION = Gauge(
    "mlmesh_monitor_precision_macro",
    "Mean per-class precision over the metrics window.",
    ["model", "version"],
    registry=REGISTRY,
)
RECALL = Gauge(
    "mlmesh_monitor_recall_macro",
    "Mean per-class recall over the metrics window.",
    ["model", "version"],
    registry=REGISTRY,
)
LABELLED = Gauge(
    "mlmesh_monitor_labelled_predictions",
    "Predictions with feedback in the metrics window (accuracy's sample size).",
    ["model", "version"],
    registry=REGISTRY,
)
WINDOW_REQUESTS = Gauge(
    "mlmesh_monitor_window_predictions",
    "Logged predictions in the metrics window.",
    ["model", "version"],
    registry=REGISTRY,
)
WINDOW_ERROR_RATE = Gauge(
    "mlmesh_monitor_error_rate",
    "Share of logged predictions in the metrics window whose status is not OK.",
    ["model", "version"],
    registry=REGISTRY,
)
PSI = Gauge(
    "mlmesh_monitor_feature_psi",
    "Population stability index of a feature over the metrics window.",
    ["model", "version", "feature"],
    registry=REGISTRY,
)
DRIFT_STATUS = Gauge(
    "mlmesh_monitor_drift_status",
    "Worst feature drift: 0 insufficient data, 1 ok, 2 warn, 3 alert.",
    ["model", "version"],
    registry=REGISTRY,
)
REVIEW_SUBMITTED = Counter(
    "mlmesh_monitor_review_submitted",
    "Low-confidence predictions sent to the review queue.",
    ["model"],
    registry=REGISTRY,
)
REFRESH_FAILURES = Counter(
    "mlmesh_monitor_refresh_failures",
    "Periodic gauge refreshes that failed (the gauges keep their last values).",
    registry=REGISTRY,
)

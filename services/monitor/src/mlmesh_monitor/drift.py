"""Input drift: a training reference (per-feature bin edges and shares) and
the population stability index of logged inputs against it. Pure
computation (numpy): the servicer runs it in a worker thread."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from mlmesh.monitor.v1 import monitor_pb2 as pb
from mlmesh_chassis.errors import FieldViolation, InvalidArgument

DEFAULT_WARN = 0.1
DEFAULT_ALERT = 0.25
# Shares are floored here so an empty bin does not make PSI infinite.
FLOOR = 1e-4
SHOWN_VIOLATIONS = 5


def bin_shares(values: np.ndarray, edges: Sequence[float] | np.ndarray) -> np.ndarray:
    """The share of ``values`` in each of len(edges) + 1 bins
    (-inf, e0], (e0, e1], ..., (e_last, +inf)."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")
    counts = np.bincount(index, minlength=len(edges) + 1).astype(np.float64)
    return counts / max(len(values), 1)


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> float:
    """sum((a - e) * ln(a / e)) over the bins, shares floored at FLOOR."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def status_of(value: float, warn: float, alert: float) -> int:
    if value >= alert:
        return pb.DRIFT_STATUS_ALERT
    if value >= warn:
        return pb.DRIFT_STATUS_WARN
    return pb.DRIFT_STATUS_OK


def thresholds(reference: pb.DriftReference) -> tuple[float, float]:
    return (
        reference.warn_threshold or DEFAULT_WARN,
        reference.alert_threshold or DEFAULT_ALERT,
    )


def normalized(reference: pb.DriftReference) -> pb.DriftReference:
    """The reference checked beyond its field rules (edges increasing, one
    share per bin summing to 1, distinct indexes, alert not below warn),
    thresholds defaulted; INVALID_ARGUMENT naming every bad field."""
    violations: list[FieldViolation] = []
    seen: set[int] = set()
    for i, feature in enumerate(reference.features):
        path = f"reference.features[{i}]"
        if feature.index in seen:
            violations.append(FieldViolation(f"{path}.index", "repeats an earlier feature's index"))
        seen.add(feature.index)
        edges = list(feature.edges)
        if any(b <= a for a, b in itertools.pairwise(edges)):
            violations.append(FieldViolation(f"{path}.edges", "must be strictly increasing"))
        if len(feature.proportions) != len(edges) + 1:
            violations.append(
                FieldViolation(
                    f"{path}.proportions",
                    f"must hold len(edges) + 1 = {len(edges) + 1} shares, "
                    f"not {len(feature.proportions)}",
                )
            )
        elif not math.isclose(sum(feature.proportions), 1.0, abs_tol=1e-6):
            violations.append(FieldViolation(f"{path}.proportions", "must sum to 1"))
    warn, alert = thresholds(reference)
    if alert < warn:
        violations.append(
            FieldViolation("reference.alert_threshold", "must not be below warn_threshold")
        )
    if violations:
        raise InvalidArgument.listing(violations, SHOWN_VIOLATIONS, prefix="bad reference: ")
    out = pb.DriftReference()
    out.CopyFrom(reference)
    out.warn_threshold, out.alert_threshold = warn, alert
    out.ClearField("update_time")
    return out


def reference_from_rows(
    rows: np.ndarray, bins: int = 10, names: Sequence[str] | None = None
) -> list[pb.FeatureBins]:
    """Per column of ``rows`` (training data, rows x features): edges at its
    distinct deciles (fewer for a feature with few distinct values) and the
    share of rows in each bin."""
    features = []
    quantiles = np.linspace(0, 1, bins + 1)[1:-1]
    for column in range(rows.shape[1]):
        values = rows[:, column].astype(np.float64)
        edges = np.unique(np.quantile(values, quantiles))
        if len(edges) == 0:  # unreachable with bins > 1; kept for bins == 1
            edges = np.array([float(values.min())])
        features.append(
            pb.FeatureBins(
                index=column,
                name=names[column] if names is not None else f"f{column}",
                edges=edges.tolist(),
                proportions=bin_shares(values, edges).tolist(),
            )
        )
    return features


def drift(
    reference: pb.DriftReference, blobs: Sequence[bytes], min_rows: int
) -> tuple[int, int, list[pb.FeatureDrift]]:
    """(rows compared, the worst status, PSI per feature) of logged feature
    vectors (float32 blobs) against ``reference``. Rows shorter than the
    reference's largest index are left out."""
    need = max(f.index for f in reference.features) + 1
    vectors = [np.frombuffer(b, dtype="<f4") for b in blobs]
    kept = [v for v in vectors if len(v) >= need]
    warn, alert = thresholds(reference)
    if len(kept) < min_rows:
        return (
            len(kept),
            pb.DRIFT_STATUS_INSUFFICIENT_DATA,
            [
                pb.FeatureDrift(
                    index=f.index, name=f.name, status=pb.DRIFT_STATUS_INSUFFICIENT_DATA
                )
                for f in sorted(reference.features, key=lambda f: f.index)
            ],
        )
    matrix = np.stack([v[:need] for v in kept]).astype(np.float64)
    out = []
    for feature in sorted(reference.features, key=lambda f: f.index):
        value = psi(feature.proportions, bin_shares(matrix[:, feature.index], feature.edges))
        out.append(
            pb.FeatureDrift(
                index=feature.index,
                name=feature.name,
                psi=value,
                status=status_of(value, warn, alert),  # type: ignore[arg-type]
            )
        )
    worst = max((f.status for f in out), default=pb.DRIFT_STATUS_OK)
    return len(kept), worst, out

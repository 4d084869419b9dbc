"""Quality figures over logged predictions: operational (requests, error
rate, latency percentiles) over all of them, accuracy, precision and recall
(per class and macro) over those with feedback. Pure computation: the
servicer runs it in a worker thread."""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from mlmesh_monitor.store import QualityRow

# The most classes one QualityFigures lists (the macro figures count all).
MAX_LISTED_CLASSES = 100


@dataclass(frozen=True)
class ClassFigures:
    label: str
    support: int
    predicted: int
    precision: float
    recall: float


@dataclass
class Figures:
    start: dt.datetime
    end: dt.datetime
    request_count: int = 0
    error_rate: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    labelled_count: int = 0
    accuracy: float = 0.0
    macro_precision: float = 0.0
    macro_recall: float = 0.0
    classes: list[ClassFigures] = field(default_factory=list)
    classes_omitted: int = 0


@dataclass
class VersionFigures:
    version: int
    overall: Figures
    buckets: list[Figures]


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank (0 for no values)."""
    if not sorted_values:
        return 0.0
    rank = max(math.ceil(q * len(sorted_values)), 1)
    return float(sorted_values[rank - 1])


def figures(rows: Sequence[QualityRow], start: dt.datetime, end: dt.datetime) -> Figures:
    out = Figures(start, end, request_count=len(rows))
    if not rows:
        return out
    out.error_rate = sum(r.status != "OK" for r in rows) / len(rows)
    latencies = sorted(r.latency_ms for r in rows)
    out.latency_p50_ms = nearest_rank(latencies, 0.50)
    out.latency_p99_ms = nearest_rank(latencies, 0.99)
    pairs = [
        (r.predicted_label, r.label) for r in rows if r.label is not None and r.predicted_label
    ]
    out.labelled_count = len(pairs)
    if not pairs:
        return out
    right = Counter(p for p, t in pairs if p == t)
    predicted = Counter(p for p, _ in pairs)
    support = Counter(t for _, t in pairs)
    out.accuracy = sum(right.values()) / len(pairs)
    for label in sorted(set(predicted) | set(support)):
        out.classes.append(
            ClassFigures(
                label,
                support[label],
                predicted[label],
                right[label] / predicted[label] if predicted[label] else 0.0,
                right[label] / support[label] if support[label] else 0.0,
            )
        )
    out.macro_precision = sum(c.precision for c in out.classes) / len(out.classes)
    out.macro_recall = sum(c.recall for c in out.classes) / len(out.classes)
    if len(out.classes) > MAX_LISTED_CLASSES:
        # Labels are callers' text: list the classes seen most often.
        busiest = sorted(out.classes, key=lambda c: (-(c.support + c.predicted), c.label))
        kept = {c.label for c in busiest[:MAX_LISTED_CLASSES]}
        out.classes_omitted = len(out.classes) - MAX_LISTED_CLASSES
        out.classes = [c for c in out.classes if c.label in kept]
    return out


def by_version(
    rows: Sequence[QualityRow],
    start: dt.datetime,
    end: dt.datetime,
    bucket: dt.timedelta | None = None,
) -> list[VersionFigures]:
    """Figures per version over [start, end), and per bucket when asked."""
    versions: dict[int, list[QualityRow]] = {}
    for row in rows:
        versions.setdefault(row.version, []).append(row)
    edges = bucket_edges(start, end, bucket) if bucket is not None else []
    result = []
    for version in sorted(versions):
        mine = versions[version]
        buckets: list[Figures] = []
        if edges:
            # Sorted by time once, each bucket a slice found by bisection:
            # O(rows log rows), not O(rows x buckets).
            ordered = sorted(mine, key=lambda r: r.time)
            times = [r.time for r in ordered]
            for low, high in itertools.pairwise(edges):
                first, last = bisect.bisect_left(times, low), bisect.bisect_left(times, high)
                buckets.append(figures(ordered[first:last], low, high))
        result.append(VersionFigures(version, figures(mine, start, end), buckets))
    return result


def bucket_edges(start: dt.datetime, end: dt.datetime, bucket: dt.timedelta) -> list[dt.datetime]:
    edges = [start]
    while edges[-1] < end:
        edges.append(min(edges[-1] + bucket, end))
    return edges

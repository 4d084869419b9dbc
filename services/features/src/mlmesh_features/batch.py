"""The batch computation of feature views: the one the definitions compile
to for backfills, materialization and training sets.

Row views: one output row per source event, at the event's time, each
feature its expression over the event's columns (and earlier features).

Windowed views, in event time: window ends lie on a grid ``step`` apart
from the epoch. The value of a feature at window end ``t`` aggregates the
entity's events with ``t - window <= event time < t``. A row is written at
every window end whose longest window holds an event of the entity, so a
count falls back to 0 once its events age out of a short window. An empty
window gives 0 for count and count_distinct and null for the others; mean is
sum / count in float64; last is the value of the latest event (by event time,
then by position in the source). Late events are simply events: the batch
path sees all of them, which is the reference the streaming path is held to.

``point_in_time_join`` builds training sets: for each entity row and time T,
each view's latest row at or before T (and within the view's ttl). A
windowed row at end ``t <= T`` only holds events before ``t``, so nothing
from after T leaks in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mlmesh_features import expressions as ex
from mlmesh_features.definitions import Aggregation, Definitions, FeatureView

EVENT_TIMESTAMP = "event_timestamp"

PANDAS_TYPES = {ex.INT64: "Int64", ex.DOUBLE: "float64", ex.STRING: "string", ex.BOOL: "boolean"}


def compute_view(defs: Definitions, view: FeatureView, events: pd.DataFrame) -> pd.DataFrame:
    """``view``'s rows from its source's ``events`` (the source's columns and
    its timestamp field): the join keys, ``event_timestamp`` and the features."""
    source = defs.sources[view.source]
    keys = defs.join_keys(view)
    frame = events.rename(columns={source.timestamp_field: EVENT_TIMESTAMP})
    frame[EVENT_TIMESTAMP] = pd.to_datetime(frame[EVENT_TIMESTAMP], utc=True)
    if view.windowed:
        return _windowed(view, keys, frame)
    out = frame[[*keys, EVENT_TIMESTAMP]].copy()
    # Names read the source's columns first (definitions.RowFeature.reads):
    # a feature named like a column never replaces it for the others.
    work = frame.copy()
    values = {}
    for feature in view.row_order():
        values[feature.name] = ex.evaluate(feature.expression, work)
        if feature.name not in source.columns:
            work[feature.name] = values[feature.name]
    for feature in view.features:
        out[feature.name] = values[feature.name].astype(PANDAS_TYPES[feature.type])
    return out.reset_index(drop=True)


def _windowed(view: FeatureView, keys: list[str], frame: pd.DataFrame) -> pd.DataFrame:
    assert view.step is not None
    step = pd.Timedelta(view.step).value  # ns
    times = frame[EVENT_TIMESTAMP].astype("int64").to_numpy()
    frame = frame.assign(_seq=np.arange(len(frame)), _ns=times)
    longest = max(a.window for a in view.aggregations)
    # Every (entity, end) with an event in its longest window.
    ends = _ends(frame, keys, pd.Timedelta(longest).value, step)
    result = ends
    for aggregation in view.aggregations:
        values = _aggregate(frame, keys, aggregation, step)
        result = result.merge(values, on=[*keys, "_end"], how="left")
        if aggregation.function in ("count", "count_distinct"):
            result[aggregation.name] = result[aggregation.name].fillna(0)
        result[aggregation.name] = result[aggregation.name].astype(PANDAS_TYPES[aggregation.type])
    result[EVENT_TIMESTAMP] = pd.to_datetime(result["_end"], utc=True)
    columns = [*keys, EVENT_TIMESTAMP, *(a.name for a in view.aggregations)]
    return result.sort_values([*keys, EVENT_TIMESTAMP]).reset_index(drop=True)[columns]


def _contributions(frame: pd.DataFrame, window_ns: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """For each event, the window ends t (on the grid) with t - window <= ts < t:
    (index of the event, t), flattened."""
    ts = frame["_ns"].to_numpy()
    first = (ts // step + 1) * step  # the first end after ts
    last = ((ts + window_ns) // step) * step  # the last end with ts >= t - window
    count = np.maximum((last - first) // step + 1, 0)
    rows = np.repeat(np.arange(len(ts)), count)
    offsets = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    return rows, np.repeat(first, count) + offsets * step


def _ends(frame: pd.DataFrame, keys: list[str], window_ns: int, step: int) -> pd.DataFrame:
    rows, ends = _contributions(frame, window_ns, step)
    out = frame.iloc[rows][keys].reset_index(drop=True)
    out["_end"] = ends
    return out.drop_duplicates().reset_index(drop=True)


def _aggregate(
    frame: pd.DataFrame, keys: list[str], aggregation: Aggregation, step: int
) -> pd.DataFrame:
    rows, ends = _contributions(frame, pd.Timedelta(aggregation.window).value, step)
    columns = [*keys, "_ns", "_seq"] + ([aggregation.column] if aggregation.column else [])
    exploded = frame.iloc[rows][columns].reset_index(drop=True)
    exploded["_end"] = ends
    group = [*keys, "_end"]
    name, column, function = aggregation.name, aggregation.column, aggregation.function
    if function == "count":
        values = exploded.groupby(group).size().rename(name)
    elif function == "last":
        latest = exploded.sort_values([*group, "_ns", "_seq"]).groupby(group).tail(1)
        values = latest.set_index(group)[column].rename(name)
    elif function == "count_distinct":
        values = exploded.groupby(group)[column].nunique().rename(name)
    elif function == "mean":
        grouped = exploded.groupby(group)[column]
        values = (grouped.sum().astype("float64") / grouped.count()).rename(name)
    else:  # sum, min, max
        values = getattr(exploded.groupby(group)[column], function)().rename(name)
    return values.reset_index()


def point_in_time_join(
    defs: Definitions,
    entity_rows: pd.DataFrame,
    features: Sequence[tuple[str, str]],
    view_rows: dict[str, pd.DataFrame],
    full_feature_names: bool = False,
) -> pd.DataFrame:
    """``entity_rows`` (join keys and ``event_timestamp``) with each
    (view, feature) as of that time: the view's latest row at or before it,
    and within the view's ttl (else null)."""
    out = entity_rows.copy()
    out[EVENT_TIMESTAMP] = pd.to_datetime(out[EVENT_TIMESTAMP], utc=True)
    out["_order"] = np.arange(len(out))
    by_view: dict[str, list[str]] = {}
    for view_name, feature in features:
        by_view.setdefault(view_name, []).append(feature)
    for view_name, names in by_view.items():
        view = defs.feature_views[view_name]
        keys = defs.join_keys(view)
        rows = view_rows[view_name][[*keys, EVENT_TIMESTAMP, *names]].copy()
        rows["_row_time"] = rows[EVENT_TIMESTAMP]
        rows = rows.sort_values(EVENT_TIMESTAMP)
        left = out.sort_values(EVENT_TIMESTAMP)
        joined = pd.merge_asof(
            left,
            rows.drop(columns=[EVENT_TIMESTAMP])
            .rename(columns={"_row_time": "_t"})
            .assign(**{EVENT_TIMESTAMP: rows[EVENT_TIMESTAMP]}),
            on=EVENT_TIMESTAMP,
            by=keys,
            direction="backward",
            allow_exact_matches=True,
        )
        if view.ttl is not None:
            stale = joined["_t"].isna() | (joined[EVENT_TIMESTAMP] - joined["_t"] > view.ttl)
            for name in names:
                joined.loc[stale, name] = None
        renamed = {n: f"{view_name}__{n}" for n in names} if full_feature_names else {}
        out = joined.drop(columns=["_t"]).rename(columns=renamed)
    return out.sort_values("_order").drop(columns=["_order"]).reset_index(drop=True)

"""The batch computation against a brute-force reference: every window end
of every entity, late and out-of-order events included; point-in-time joins
never see the future."""

from __future__ import annotations

import math

import pandas as pd
from features_fixtures import GOOD, events
from mlmesh_features.batch import EVENT_TIMESTAMP, compute_view, point_in_time_join
from mlmesh_features.definitions import parse

HOUR = pd.Timedelta(hours=1)


def reference(
    frame: pd.DataFrame, user: int, end: pd.Timestamp, window: pd.Timedelta
) -> pd.DataFrame:
    mine = frame[frame.user_id == user]
    return mine[(mine.event_time >= end - window) & (mine.event_time < end)]


def test_windowed_aggregates_match_a_brute_force_reference_at_every_window_end():
    defs = parse(GOOD)
    source = events()
    rows = compute_view(defs, defs.feature_views["user_spend"], source)
    assert len(rows) > 100
    for row in rows.itertuples():
        end = getattr(row, EVENT_TIMESTAMP)
        assert end == end.floor("h")
        day = reference(source, row.user_id, end, pd.Timedelta(days=1))
        hour = reference(source, row.user_id, end, HOUR)
        assert len(day) > 0  # a row only where the longest window holds an event
        assert math.isclose(row.spend_1d, day.amount.sum(), rel_tol=1e-12)
        assert row.purchases_1h == len(hour)
        assert row.categories_1d == day.category.nunique()
    # every end whose day window holds an event is there
    expected = set()
    for event in source.itertuples():
        first = event.event_time.floor("h") + HOUR
        for k in range(24):
            if first + k * HOUR <= event.event_time + pd.Timedelta(days=1):
                expected.add((event.user_id, first + k * HOUR))
    assert set(zip(rows.user_id, rows[EVENT_TIMESTAMP], strict=True)) == expected


def test_mean_min_max_and_last_with_ties_in_event_time():
    source_yaml = GOOD.replace(
        "      - {name: purchases_1h, function: count, window: 1h}",
        "      - {name: purchases_1h, function: count, window: 1h}\n"
        "      - {name: mean_2h, function: mean, column: amount, window: 2h}\n"
        "      - {name: min_2h, function: min, column: amount, window: 2h}\n"
        "      - {name: max_2h, function: max, column: amount, window: 2h}\n"
        "      - {name: last_2h, function: last, column: category, window: 2h}",
    )
    defs = parse(source_yaml)
    t = pd.Timestamp("2026-11-01 10:15", tz="UTC")
    source = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 2],
            "event_time": [t, t, t - pd.Timedelta(minutes=30), t],
            "amount": [10.0, 30.0, 5.0, 7.0],
            "category": ["x", "y", "z", "w"],
        }
    )
    rows = compute_view(defs, defs.feature_views["user_spend"], source).set_index(
        ["user_id", EVENT_TIMESTAMP]
    )
    at = rows.loc[(1, pd.Timestamp("2026-11-01 11:00", tz="UTC"))]
    assert at.mean_2h == 15.0 and at.min_2h == 5.0 and at.max_2h == 30.0
    assert at.last_2h == "y"  # same time: the later one in the source wins
    assert at.purchases_1h == 2  # [10:00, 11:00): not the 9:45 one
    later = rows.loc[(1, pd.Timestamp("2026-11-01 12:00", tz="UTC"))]
    assert later.purchases_1h == 0 and later.mean_2h == 20.0  # [10:00, 12:00): the two at 10:15


def test_row_features_follow_their_dependencies():
    defs = parse(GOOD)
    source = events(20)
    rows = compute_view(defs, defs.feature_views["user_purchases"], source)
    assert list(rows.doubled) == list(source.amount * 2)
    assert list(rows.big) == list(source.amount * 2 > 200)


def test_point_in_time_join_takes_the_latest_row_before_and_never_the_future():
    defs = parse(GOOD)
    source = events()
    views = {
        name: compute_view(defs, defs.feature_views[name], source)
        for name in ("user_spend", "user_purchases")
    }
    when = pd.Timestamp("2026-11-02 12:34", tz="UTC")
    entity_rows = pd.DataFrame(
        {"user_id": [3, 0, 99], EVENT_TIMESTAMP: [when, when - pd.Timedelta(hours=5), when]}
    )
    joined = point_in_time_join(
        defs, entity_rows, [("user_spend", "spend_1d"), ("user_purchases", "doubled")], views
    )
    assert list(joined.user_id) == [3, 0, 99]  # the request's order
    for row in joined.itertuples():
        asof = getattr(row, EVENT_TIMESTAMP)
        if row.user_id == 99:
            assert pd.isna(row.spend_1d) and pd.isna(row.doubled)
            continue
        end = asof.floor("h")
        assert math.isclose(
            row.spend_1d,
            reference(source, row.user_id, end, pd.Timedelta(days=1)).amount.sum(),
            rel_tol=1e-12,
        )
        mine = source[(source.user_id == row.user_id) & (source.event_time <= asof)]
        latest = mine.sort_values("event_time", kind="stable").iloc[-1]
        assert row.doubled == latest.amount * 2

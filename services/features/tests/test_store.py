"""The store on real Feast (file registry, SQLite online store): apply as
one diffed, versioned change with a dry run; materialize and read back with
statuses; a failed apply leaves the last revision in force."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from mlmesh_features.definitions import parse
from mlmesh_features.store import FeatureStore


def actions(applied):
    return {(c.kind, c.name): c.action for c in applied.changes}


def test_apply_is_diffed_versioned_and_has_a_dry_run(repo):
    store, source, _ = repo
    dry = store.apply(source, parse(source), prune=False, validate_only=True)
    assert dry.revision == 0 and set(actions(dry).values()) == {"created"}
    assert store.feast().list_feature_views() == []  # nothing applied
    first = store.apply(source, parse(source), prune=False, validate_only=False)
    assert first.revision == 1
    assert {v.name for v in store.feast().list_feature_views()} == {"user_purchases", "user_spend"}
    again = store.apply(source, parse(source), prune=False, validate_only=False)
    assert again.revision == 1 and set(actions(again).values()) == {"unchanged"}
    changed = source.replace("ttl: 2d", "ttl: 3d")
    second = store.apply(changed, parse(changed), prune=False, validate_only=False)
    assert second.revision == 2
    assert actions(second)[("feature_view", "user_purchases")] == "updated"
    # Dropping a service without prune keeps it; with prune it goes.
    without = changed.split("feature_services:")[0]
    kept = store.apply(without, parse(without), prune=False, validate_only=False)
    assert [s.name for s in store.feast().list_feature_services()] == ["fraud_model"]
    pruned = store.apply(without, parse(without), prune=True, validate_only=False)
    assert actions(pruned)[("feature_service", "fraud_model")] == "deleted"
    assert store.feast().list_feature_services() == []
    assert pruned.revision == kept.revision + 1
    # A new process sees the revision in force.
    reopened = FeatureStore(store.root)
    assert (
        reopened.revision == pruned.revision
        and "fraud_model" not in reopened.definitions.feature_services
    )


def test_a_failed_apply_leaves_the_last_revision_in_force(repo, monkeypatch):
    store, source, _ = repo
    store.apply(source, parse(source), prune=False, validate_only=False)
    feast = store.feast()

    def broken(*args, **kwargs):
        raise RuntimeError("registry unreachable")

    monkeypatch.setattr(feast, "apply", broken)
    changed = source.replace("ttl: 2d", "ttl: 3d")
    with pytest.raises(RuntimeError):
        store.apply(changed, parse(changed), prune=False, validate_only=False)
    assert store.revision == 1 and FeatureStore(store.root).revision == 1
    assert store.definitions.feature_views["user_purchases"].ttl == timedelta(days=2)


def test_materialized_values_read_back_with_status_and_event_time(repo):
    store, source, frame = repo
    store.apply(source, parse(source), prune=False, validate_only=False)
    assert store.materialize("user_purchases") == len(frame)
    rows = store.read("user_purchases", ["doubled", "big"], [{"user_id": 1}, {"user_id": 404}])
    latest = frame[frame.user_id == 1].sort_values("event_time", kind="stable").iloc[-1]
    doubled, big = rows[0]
    assert doubled.status == "present" and doubled.value == latest.amount * 2
    assert big.value == bool(latest.amount * 2 > 200)
    assert doubled.event_time == latest.event_time.to_pydatetime()
    assert [v.status for v in rows[1]] == ["not_found", "not_found"]
    store.materialize("user_spend")
    spend = store.read("user_spend", ["spend_1d", "purchases_1h"], [{"user_id": 1}])[0]
    assert spend[0].status == "present" and spend[1].value >= 0


def test_values_older_than_the_ttl_are_outside_max_age(repo):
    store, source, _ = repo
    store.apply(source, parse(source), prune=False, validate_only=False)
    old = datetime.now(UTC) - timedelta(days=5)
    store.write(
        "user_purchases",
        pd.DataFrame({"user_id": [7], "event_timestamp": [old], "doubled": [1.0], "big": [False]}),
    )
    value = store.read("user_purchases", ["doubled"], [{"user_id": 7}])[0][0]
    assert value.status == "outside_max_age" and value.value is None

"""Shared test data for the feature service's tests: a good definitions
document and generated purchase events."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_FEATURES
from mlmesh_chassis.testing import RedisServer, bootstrap_keys_file
from mlmesh_features.config import FeaturesSettings

GOOD = textwrap.dedent(
    """\
    entities:
      - {name: user, join_key: user_id, value_type: int64}
    sources:
      - name: purchases
        kind: stream
        path: data/purchases.parquet
        timestamp_field: event_time
        columns: {user_id: int64, amount: double, category: string}
    feature_views:
      - name: user_purchases
        entities: [user]
        source: purchases
        ttl: 2d
        features:
          - {name: doubled, type: double, expression: "amount * 2"}
          - {name: big, type: bool, expression: "doubled > 200"}
      - name: user_spend
        entities: [user]
        source: purchases
        step: 1h
        aggregations:
          - {name: spend_1d, function: sum, column: amount, window: 1d}
          - {name: purchases_1h, function: count, window: 1h}
          - {name: categories_1d, function: count_distinct, column: category, window: 1d}
    feature_services:
      - {name: fraud_model, features: ["user_spend:spend_1d", "user_purchases"]}
    """
)


def events(n: int = 400, seed: int = 7) -> pd.DataFrame:
    rng = random.Random(seed)
    start = pd.Timestamp("2026-11-01", tz="UTC")
    rows = [
        {
            "user_id": rng.randrange(5),
            # shuffled below: the source's order is not time order
            "event_time": start + pd.Timedelta(seconds=rng.randrange(3 * 86400)),
            "amount": round(rng.uniform(1, 300), 2),
            "category": rng.choice("abcd"),
        }
        for _ in range(n)
    ]
    rng.shuffle(rows)
    return pd.DataFrame(rows)


def service_settings(tmp_path: Path, **settings: Any) -> tuple[FeaturesSettings, str]:
    """Settings for an in-process feature service on port 0 that checks keys
    from a bootstrap keys file (no gateway), quick to stop; ``settings``
    (root, online_store, ...) on top. Returns them and the FEATURES key's
    secret."""
    keys, secret = bootstrap_keys_file(tmp_path, [PLATFORM_SERVICE_FEATURES])
    defaults: dict[str, Any] = {
        "port": 0,
        "metrics_port": -1,
        "drain_seconds": 0.0,
        "grace_seconds": 1.0,
        "bootstrap_keys_file": keys,
    }
    return FeaturesSettings(**(defaults | settings)), secret


def private_online_store(kind: str, tmp_path: Path) -> tuple[str, RedisServer | None]:
    """The online store setting for ``kind``: "" (SQLite in the root), or
    the URL of a private Redis server started here (the caller stops it)."""
    if kind != "redis":
        return "", None
    redis = RedisServer(tmp_path, tcp=True)
    redis.start()
    return redis.url, redis

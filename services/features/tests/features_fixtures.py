"""Shared test data for the feature service's tests: a good definitions
document and generated purchase events."""

from __future__ import annotations

import random
import textwrap

import pandas as pd

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

"""`python -m mlmesh_features.demo --root DIR`: generate the demo purchases,
apply the demo definitions to the feature store in DIR and materialize every
view, before the service starts (the runner's prepare step for features).

The events cover the 3 days before now (so windows and ttls hold when the
mesh starts), 200 users, 5000 purchases, seeded: the same run gives the same
values. Applying again changes nothing; the data is generated afresh each
time.
"""

from __future__ import annotations

import argparse
import logging
import random
from importlib import resources
from pathlib import Path

import pandas as pd

from mlmesh_features.definitions import parse
from mlmesh_features.store import FeatureStore

log = logging.getLogger("mlmesh.features.demo")


def purchases(users: int = 200, events: int = 5000, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    now = pd.Timestamp.now(tz="UTC").floor("min")
    rows = []
    for _ in range(events):
        rows.append(
            {
                "user_id": rng.randrange(1, users + 1),
                "event_time": now - pd.Timedelta(seconds=rng.randrange(3 * 86400)),
                "amount": round(rng.lognormvariate(3.5, 0.9), 2),
                "category": rng.choice(["books", "games", "food", "travel", "tools"]),
                "coupon": rng.random() < 0.2,
            }
        )
    return pd.DataFrame(rows)


def prepare(root: Path) -> None:
    store = FeatureStore(root)
    data = root / "demo" / "purchases.parquet"
    data.parent.mkdir(parents=True, exist_ok=True)
    purchases().to_parquet(data)
    source = resources.files(__package__).joinpath("feature_repo.yaml").read_text()
    source = source.replace("{data}", str(data))
    applied = store.apply(source, parse(source), prune=False, validate_only=False)
    rows = {view: store.materialize(view) for view in store.definitions.feature_views}
    log.info(
        "demo features: revision %d, rows computed %s (the latest of each user is online)",
        applied.revision,
        rows,
    )
    print(f"demo features: revision {applied.revision}, rows computed {rows}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    prepare(parser.parse_args().root)


if __name__ == "__main__":
    main()

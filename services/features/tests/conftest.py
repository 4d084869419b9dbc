"""The feature service's test fixtures."""

from __future__ import annotations

import pandas as pd
import pytest
from features_fixtures import GOOD, events
from mlmesh_features.store import FeatureStore


@pytest.fixture
def repo(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    frame = events()
    # recent events, so the 2-day ttl holds for some
    shift = pd.Timestamp.now(tz="UTC").floor("h") - frame.event_time.max() - pd.Timedelta(hours=2)
    frame["event_time"] = frame.event_time + shift
    frame.to_parquet(data / "purchases.parquet")
    source = GOOD.replace("data/purchases.parquet", str(data / "purchases.parquet"))
    return FeatureStore(tmp_path / "store"), source, frame

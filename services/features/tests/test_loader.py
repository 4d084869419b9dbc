"""The loader: committed Flink output files (the streaming interface's
format) reach the online store as each entity's newest window end; an older
file read later never moves a value back; in-progress (hidden) files are
ignored; a restarted loader reads everything again harmlessly. On real
Feast, SQLite and Redis."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pandas as pd
import pytest
from features_fixtures import GOOD, service_settings
from google.protobuf import struct_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh_chassis.testing import RedisServer, keyed_channel
from mlmesh_features.config import FeaturesSettings
from mlmesh_features.definitions import parse
from mlmesh_features.server import build_server
from mlmesh_features.store import FeastThread, FeatureStore
from mlmesh_features.streaming.loader import StreamLoader, output_directory

FEATURES = ["spend_1d", "purchases_1h", "categories_1d"]
HOUR_MS = 3_600_000
T = 1_796_000_000_000 // HOUR_MS * HOUR_MS  # a window end on the hourly grid


def _row(user: int, end: int, spend: float | None, count: int) -> dict:
    return {
        "user_id": user,
        "window_end_ms": end,
        "spend_1d": spend,
        "purchases_1h": count,
        "categories_1d": count,
    }


def _commit(store: FeatureStore, name: str, *rows: dict) -> Path:
    path = output_directory(store.root, "user_spend") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(params=["sqlite", "redis"])
async def loader(request, tmp_path):
    redis = None
    online = None
    if request.param == "redis":
        redis = RedisServer(tmp_path, tcp=True)
        redis.start()
        online = FeaturesSettings(online_store=redis.url).online_store_config()
    feast = FeastThread()
    store = FeatureStore(tmp_path / "store", online)
    await feast.run(lambda: store.apply(GOOD, parse(GOOD), prune=False, validate_only=False))
    yield store, feast
    await feast.close()
    if redis is not None:
        redis.stop()


async def _online(store: FeatureStore, feast: FeastThread, *users: int) -> list[tuple]:
    rows = await feast.run(store.read, "user_spend", FEATURES, [{"user_id": u} for u in users])
    return [
        (
            int(row[0].event_time.timestamp() * 1000) if row[0].event_time else None,
            *(v.value for v in row),
        )
        for row in rows
    ]


async def test_newest_window_end_per_entity_reaches_the_online_store(loader):
    store, feast = loader
    _commit(
        store,
        "part-a-0",
        _row(1, T - HOUR_MS, 5.0, 1),
        _row(1, T, 12.5, 2),
        _row(2, T - HOUR_MS, None, 0),  # an empty short window: null sum, 0 count
    )
    # in progress: hidden, so not committed yet
    _commit(store, ".part-a-1.inprogress.1234", _row(1, T + HOUR_MS, 99.0, 9))
    _commit(store, "_SUCCESS", _row(1, T + HOUR_MS, 99.0, 9))
    first = StreamLoader(store, feast)
    assert await first.poll() == 2
    assert await _online(store, feast, 1, 2, 3) == [
        (T, 12.5, 2, 2),
        (T - HOUR_MS, None, 0, 0),
        (None, None, None, None),
    ]
    # An older window end, committed (or read) later, does not move it back;
    # a newer one in a bucket folder does move it on.
    _commit(store, "part-b-0", _row(1, T - 2 * HOUR_MS, 1.0, 1), _row(2, T, 7.0, 1))
    _commit(store, "2026-12-06--04/part-c-0", _row(1, T + 2 * HOUR_MS, 30.0, 3))
    assert await first.poll() == 2
    assert await first.poll() == 0  # nothing new
    assert await _online(store, feast, 1, 2) == [(T + 2 * HOUR_MS, 30.0, 3, 3), (T, 7.0, 1, 1)]
    # A restarted loader reads every file again: the same values.
    again = StreamLoader(store, feast)
    await again.poll()
    assert await _online(store, feast, 1, 2) == [(T + 2 * HOUR_MS, 30.0, 3, 3), (T, 7.0, 1, 1)]
    # An in-progress file, once committed (renamed), is loaded.
    hidden = output_directory(store.root, "user_spend") / ".part-a-1.inprogress.1234"
    hidden.rename(hidden.with_name("part-a-1"))
    _commit(store, "part-a-1", _row(1, T + 3 * HOUR_MS, 99.0, 9))
    assert await again.poll() == 1
    assert (await _online(store, feast, 1))[0] == (T + 3 * HOUR_MS, 99.0, 9, 9)


async def test_the_service_runs_the_loader_when_streaming_is_on(repo, tmp_path):
    store, source, _ = repo
    settings, secret = service_settings(
        tmp_path,
        root=store.root,
        streaming=True,
    )
    host = await build_server(settings)
    try:
        async with keyed_channel(f"127.0.0.1:{host.port}", secret) as channel:
            stub = features_service_pb2_grpc.FeatureServiceStub(channel)
            await stub.ApplyFeatureDefinitions(rpc.ApplyFeatureDefinitionsRequest(source=source))
            now = pd.Timestamp.now(tz="UTC").floor("h").value // 1_000_000
            committed = time.monotonic()
            _commit(store, "part-x-0", _row(4, now, 42.0, 3))
            request = rpc.GetOnlineFeaturesRequest(
                features=rpc.FeatureReferences(references=["user_spend:spend_1d"]),
                entity_rows=[pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=4)})],
            )
            while True:
                value = (await stub.GetOnlineFeatures(request)).rows[0].values[0]
                if value.status == pb.FEATURE_STATUS_PRESENT:
                    break
                assert time.monotonic() - committed < 5, "the loader did not load the file"
                await asyncio.sleep(0.02)
            assert value.value.number_value == 42.0
            assert value.event_time.seconds * 1000 == now
    finally:
        await host.shutdown()

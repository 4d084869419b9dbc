"""Our reader and writer of Feast's online layout (mlmesh_features.online)
against Feast's own, both ways, on SQLite and on the machine's Redis
(127.0.0.1:6379, database 14, flushed by each test): rows Feast's
write_to_online_store wrote read back right through ours, rows ours wrote
read back right through Feast's get_online_features, and both writers
store the same bytes. Every DSL type, nulls, a missing entity, a row older
than the view's ttl, and a view keyed by two entities (an int64 and a
string join key)."""

from __future__ import annotations

import math
import sqlite3
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import redis
from feast.protos.feast.serving.ServingService_pb2 import FieldStatus
from google.protobuf import struct_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh_features.definitions import parse
from mlmesh_features.online import SqliteLayout, timestamp_bytes
from mlmesh_features.servicer import _online_response, _struct_value, _struct_value_bytes
from mlmesh_features.store import FeatureStore

REDIS_DB = 14  # 12: bench/features_materialize.py, 13: bench/features_online.py
SOURCE = """\
entities:
  - {name: user, join_key: user_id, value_type: int64}
  - {name: shop, join_key: shop_code, value_type: string}
sources:
  - name: rows
    path: /nonexistent/rows.parquet
    timestamp_field: event_time
    columns: {user_id: int64, shop_code: string, n: int64, x: double, s: string, b: bool}
feature_views:
  - name: user_values
    entities: [user]
    source: rows
    ttl: 1d
    features:
      - {name: n, type: int64, expression: n}
      - {name: x, type: double, expression: x}
      - {name: s, type: string, expression: s}
      - {name: b, type: bool, expression: b}
  - name: pair_values
    entities: [user, shop]
    source: rows
    features:
      - {name: x, type: double, expression: x}
      - {name: s, type: string, expression: s}
"""
NOW = datetime.now(UTC).replace(microsecond=123456)
USER_FEATURES = ["n", "x", "s", "b"]


def user_rows() -> pd.DataFrame:
    """User 1 has every value, 2 nulls in every column (of its type), 3 is
    older than the ttl, 404 is never written."""
    return pd.DataFrame(
        {
            "user_id": [1, 2, 3],
            "n": pd.array([-(2**40), None, 7], dtype="Int64"),
            "x": [2.5, math.nan, 1.0],
            "s": ["héllo", None, "old"],
            "b": pd.array([False, None, True], dtype="boolean"),
            "event_timestamp": [NOW - timedelta(hours=1), NOW, NOW - timedelta(days=3)],
        }
    )


def pair_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [1, 1, 2],
            "shop_code": ["a", "b", "a"],
            "x": [0.0, -1e300, 3.25],
            "s": ["", "bé", "c"],
            "event_timestamp": [NOW, NOW, NOW],
        }
    )


@pytest.fixture(params=["sqlite", "redis"])
async def store(request, tmp_path):
    online = None
    if request.param == "redis":
        client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
        client.flushdb()
        online = {
            "type": "redis",
            "connection_string": f"127.0.0.1:6379,db={REDIS_DB}",
            "key_ttl_seconds": 3600,
        }
    store = FeatureStore(tmp_path / "store", online)
    store.apply(SOURCE, parse(SOURCE), prune=False, validate_only=False)
    yield store
    await store.close()
    if request.param == "redis":
        client.flushdb()
        client.close()


def feast_write(store: FeatureStore, view: str, frame: pd.DataFrame) -> None:
    store.feast().write_to_online_store(view, frame, transform_on_write=False)


def stored_time(store: FeatureStore, when: datetime) -> datetime:
    """``when`` as the store keeps it: SQLite whole seconds (Feast's
    adapter), Redis microseconds."""
    return when.replace(microsecond=0) if isinstance(store.online, SqliteLayout) else when


def check_user_values(store: FeatureStore, rows) -> None:
    one, two, old, missing = rows
    assert [(v.status, v.value) for v in one] == [
        ("present", -(2**40)),
        ("present", 2.5),
        ("present", "héllo"),
        ("present", False),
    ]
    assert {v.event_time for v in one} == {stored_time(store, NOW - timedelta(hours=1))}
    assert {v.event_time for v in two} == {stored_time(store, NOW)}
    assert [v.status for v in two] == ["null"] * 4 and {v.value for v in two} == {None}
    assert [v.status for v in old] == ["outside_max_age"] * 4
    assert {v.value for v in old} == {None}
    assert [(v.status, v.event_time) for v in missing] == [("not_found", None)] * 4


async def test_what_feast_writes_our_reader_reads(store):
    feast_write(store, "user_values", user_rows())
    feast_write(store, "pair_values", pair_rows())
    entities = [{"user_id": u} for u in (1, 2, 3, 404)]
    rows = store.read("user_values", USER_FEATURES, entities)
    check_user_values(store, rows)
    # The service's path: the asyncio client or the reader threads.
    found = await store.read_rows("user_values", USER_FEATURES, [(1,), (2,), (3,), (404,)])
    assert found.online_values() == rows
    pairs = store.read(
        "pair_values",
        ["s", "x"],
        [
            {"user_id": 1, "shop_code": "b"},
            {"user_id": 2, "shop_code": "a"},
            {"user_id": 2, "shop_code": "b"},
        ],
    )
    assert [[v.value for v in row] for row in pairs[:2]] == [["bé", -1e300], ["c", 3.25]]
    assert [v.status for v in pairs[2]] == ["not_found"] * 2


def feast_read(store: FeatureStore, view: str, features: list[str], entities: list[dict]):
    """Feast's get_online_features: per feature, its values and statuses."""
    response = store.feast().get_online_features(
        features=[f"{view}:{f}" for f in features], entity_rows=entities
    )
    names = list(response.proto.metadata.feature_names.val)
    return {
        name: (
            [v.WhichOneof("val") and getattr(v, v.WhichOneof("val")) for v in vector.values],
            [FieldStatus.Name(status) for status in vector.statuses],
        )
        for name, vector in zip(names, response.proto.results, strict=True)
    }


def test_what_we_write_feast_reads(store):
    store.write("user_values", user_rows())
    store.write("pair_values", pair_rows())
    entities = [{"user_id": u} for u in (1, 2, 3, 404)]
    got = feast_read(store, "user_values", USER_FEATURES, entities)
    assert [got[f][0][0] for f in USER_FEATURES] == [-(2**40), 2.5, "héllo", False]
    assert {got[f][1][0] for f in USER_FEATURES} == {"PRESENT"}
    assert {got[f][0][1] for f in USER_FEATURES} == {None}  # the nulls (Feast: PRESENT)
    # Feast's reader serves a row older than the ttl (the service does not).
    assert [got[f][0][2] for f in USER_FEATURES] == [7, 1.0, "old", True]
    # The missing entity (Feast on Redis says PRESENT, with empty values).
    assert {got[f][0][3] for f in USER_FEATURES} == {None}
    pairs = feast_read(
        store,
        "pair_values",
        ["x", "s"],
        [{"user_id": 1, "shop_code": "a"}, {"user_id": 1, "shop_code": "b"}],
    )
    assert pairs["x"][0] == [0.0, -1e300] and pairs["s"][0] == ["", "bé"]
    # And ours reads its own rows the same way.
    check_user_values(store, store.read("user_values", USER_FEATURES, entities))


def stored(store: FeatureStore) -> dict:
    """Everything in the online store, as stored."""
    if isinstance(store.online, SqliteLayout):
        with sqlite3.connect(store.online.path) as conn:
            return {
                table: sorted(
                    conn.execute(
                        "SELECT entity_key, feature_name, value, value_text, event_ts "
                        f'FROM "{table}"'
                    )
                )
                for table in ("mlmesh_user_values", "mlmesh_pair_values")
            }
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    try:
        return {key: client.hgetall(key) for key in client.keys("*")}
    finally:
        client.close()


def test_both_writers_store_the_same_bytes(store):
    feast_write(store, "user_values", user_rows())
    feast_write(store, "pair_values", pair_rows())
    by_feast = stored(store)
    if isinstance(store.online, SqliteLayout):
        with sqlite3.connect(store.online.path) as conn:
            conn.execute('DELETE FROM "mlmesh_user_values"')
            conn.execute('DELETE FROM "mlmesh_pair_values"')
    else:
        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    store.write("user_values", user_rows())
    store.write("pair_values", pair_rows())
    assert stored(store) == by_feast
    assert sum(len(v) for v in by_feast.values()) > 0


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_redis_keys_expire(store):
    store.write("user_values", user_rows())
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    try:
        assert all(0 < client.ttl(key) <= 3600 for key in client.keys("*"))
    finally:
        client.close()


@pytest.mark.parametrize("store", ["redis", "sqlite"], indirect=True)
def test_older_rows_do_not_overwrite_newer(store):
    """On both stores a row never moves back in time: a late Push, a
    Materialize of an earlier range or the stream loader cannot regress it."""
    store.write("user_values", user_rows())
    older = user_rows().iloc[:1].assign(x=99.0, event_timestamp=NOW - timedelta(hours=5))
    store.write("user_values", older)
    assert store.read("user_values", ["x"], [{"user_id": 1}])[0][0].value == 2.5
    newer = older.assign(event_timestamp=NOW)
    store.write("user_values", newer)
    assert store.read("user_values", ["x"], [{"user_id": 1}])[0][0].value == 99.0


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_sqlite_reads_see_writes_in_wal_mode(store):
    store.write("user_values", user_rows())
    with sqlite3.connect(store.online.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---- the response's bytes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [0.0, -2.5, 1e300, math.nan, math.inf, -math.inf, True, False, "", "é" * 200, 0, -7, 2**60],
)
def test_values_map_to_the_same_bytes_as_messages(value):
    from feast.protos.feast.types.Value_pb2 import Value

    field = {bool: "bool_val", float: "double_val", str: "string_val", int: "int64_val"}[
        type(value)
    ]
    raw = Value(**{field: value}).SerializeToString()
    assert _struct_value_bytes(raw) == _struct_value(value).SerializeToString()
    assert _struct_value_bytes(b"") is None


async def test_online_response_bytes_match_messages(store):
    store.write("user_values", user_rows())
    store.write("pair_values", pair_rows())
    entities = [(1, "a"), (2, "b"), (3, "a"), (404, "a")]
    wanted = [
        ("pair_values", "x"),
        ("user_values", "s"),
        ("user_values", "n"),
        ("pair_values", "s"),
    ]
    by_view = {"pair_values": ["x", "s"], "user_values": ["s", "n"]}
    found = {
        "pair_values": await store.read_rows("pair_values", ["x", "s"], entities),
        "user_values": await store.read_rows(
            "user_values", ["s", "n"], [(e[0],) for e in entities]
        ),
    }
    names = [f"{v}__{f}" for v, f in wanted]
    response = _online_response(names, wanted, by_view, found, len(entities))
    statuses = {
        "present": pb.FEATURE_STATUS_PRESENT,
        "not_found": pb.FEATURE_STATUS_NOT_FOUND,
        "null": pb.FEATURE_STATUS_NULL_VALUE,
        "outside_max_age": pb.FEATURE_STATUS_OUTSIDE_MAX_AGE,
    }
    values = {view: rows.online_values() for view, rows in found.items()}
    expected = pb.FeatureRow
    assert list(response.feature_names) == names
    assert len(response.rows) == len(entities)
    for index, row in enumerate(response.rows):
        want = expected()
        for view, feature in wanted:
            cell = values[view][index][by_view[view].index(feature)]
            value = want.values.add(status=statuses[cell.status], value=_struct_value(cell.value))
            if cell.event_time is not None:
                value.event_time.FromDatetime(cell.event_time)
        assert row == want, index
    # A present value and its event time, spelled out.
    first = response.rows[0].values[1]
    assert first.status == pb.FEATURE_STATUS_PRESENT and first.value == struct_pb2.Value(
        string_value="héllo"
    )
    stamp = first.event_time.SerializeToString()
    assert stamp in (
        timestamp_bytes(int((NOW - timedelta(hours=1)).timestamp()) * 10**9 + 123456000),
        timestamp_bytes(int((NOW - timedelta(hours=1)).timestamp()) * 10**9),
    )

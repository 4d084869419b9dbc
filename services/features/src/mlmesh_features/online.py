"""Feast's online-store layout, read and written without Feast's Python.

Feast stays the definitions' home and its online store's layout the storage
format: what this module writes, Feast's ``get_online_features`` reads, and
what Feast's ``write_to_online_store`` wrote, this module reads (the tests
in ``test_online_layout.py`` check both ways on both stores). The layout is
Feast 0.67's, with ``entity_key_serialization_version`` 3 and online
feature-view versioning off:

- **Entity key**: ``serialize_entity_key`` (v3): the count of join keys,
  then per join key in name order its type (STRING), length and name, then
  per value its type (INT64 or STRING), length and bytes (little-endian).
- **Redis** (``feast.infra.online_stores.redis``): one hash per entity, at
  the entity key followed by the project's name, shared by every view of
  that entity; per feature the field ``mmh3_32("<view>:<feature>")`` (4
  bytes, little-endian) holds the value as a serialized ``feast.types.Value``,
  and ``_ts:<view>`` holds the row's event time as a serialized
  ``google.protobuf.Timestamp``; ``EXPIRE key_ttl_seconds`` after each
  write when that is set. Feast's writer skips a row whose event time is not
  newer than the stored one: so does this one.
- **SQLite** (``feast.infra.online_stores.sqlite``): a table
  ``<project>_<view>`` with one row per entity and feature (entity_key,
  feature_name, value = the serialized Value, value_text, event_ts,
  created_ts). Feast's adapter stores ``event_ts`` as whole seconds of the
  naive UTC time read as local time; this module does the same. Feast's
  writer upserts whatever it is given; this one never replaces a row by an
  older one (an equal time replaces), so a late Push, a Materialize of an
  earlier range and the stream loader cannot move a value back in time, as
  on Redis.

A read is one round trip per view and call: one pipeline of HMGETs (the
requested features' fields and ``_ts:<view>``, for every entity) on
redis-py's asyncio client with a connection pool, or one SELECT on a
read-only SQLite connection (WAL mode, so reads do not wait for a writer)
of a small thread pool. What comes back stays serialized (``ViewRows``):
the servicer turns Feast's Value bytes into its response's bytes, and
``ViewRows.online_values`` decodes them for Python callers.

Limits: scalar values only (the DSL's int64, double, string and bool; any
other Value kind is decoded through protobuf), no Redis Cluster or
Sentinel, no online feature-view versioning.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import sqlite3
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import mmh3
import pandas as pd
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.timestamp_pb2 import Timestamp

from mlmesh_features import expressions as ex

# feast.types.ValueType numbers used by the entity key's serialization.
_KEY_STRING = 2
_KEY_INT64 = 4
# The Value oneof field each DSL kind is stored in.
VALUE_FIELDS = {
    ex.INT64: "int64_val",
    ex.DOUBLE: "double_val",
    ex.STRING: "string_val",
    ex.BOOL: "bool_val",
}
# Redis reads and writes at most this many entities per pipeline round.
_PIPELINE_CHUNK = 1000


# A value's status (ViewRows says when each applies).
PRESENT, NOT_FOUND, NULL, OUTSIDE_MAX_AGE = "present", "not_found", "null", "outside_max_age"


@dataclass(frozen=True)
class OnlineValue:
    value: Any  # a Python value (None when missing)
    status: str  # present | not_found | null | outside_max_age
    event_time: datetime | None


def redis_field(view: str, feature: str) -> bytes:
    """The hash field of ``view:feature``: Feast's ``_mmh3`` (murmur3_32,
    little-endian)."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp_bytes(epoch_ns: int) -> bytes:
    """A serialized google.protobuf.Timestamp, as Feast stores ``_ts``."""
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    return Timestamp(seconds=seconds, nanos=nanos).SerializeToString()


def stamp_ns(stamp: bytes) -> int:
    """The epoch nanoseconds of a serialized Timestamp."""
    parsed = Timestamp.FromString(stamp)
    return parsed.seconds * 1_000_000_000 + parsed.nanos


def stamp_datetime(stamp: bytes) -> datetime:
    """A serialized Timestamp as a datetime (UTC, microseconds)."""
    return _EPOCH + timedelta(microseconds=stamp_ns(stamp) // 1000)


def decode_value(raw: bytes) -> Any:
    """The Python value of a serialized feast Value (None for a null)."""
    proto = ValueProto.FromString(raw)
    kind = proto.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    return getattr(proto, kind)


_CONVERT: dict[str, Any] = {ex.INT64: int, ex.DOUBLE: float, ex.STRING: str, ex.BOOL: bool}


_DOUBLE_TAG = b"\x29"  # feast Value.double_val: field 5, 8 bytes little-endian
_BOOLS = {True: b"\x38\x01", False: b"\x38\x00"}  # feast Value.bool_val: field 7


def encode_column(
    kind: str, column: pd.Series, with_text: bool
) -> tuple[list[bytes], list[str | None]]:
    """Serialized feast Values of a column of ``kind``, and when asked their
    text (the value_text column of Feast's SQLite table); a null (None, NaN,
    NaT, pd.NA) becomes the empty Value and no text, as Feast writes them.
    Doubles and bools are written as protobuf writes them, without a message
    (test_online_layout compares the bytes with Feast's writer's)."""
    nulls = column.isna().tolist()
    values = column.tolist()
    convert = _CONVERT[kind]
    out: list[bytes] = []
    for value, null in zip(values, nulls, strict=True):
        if null:
            out.append(b"")
        elif kind == ex.DOUBLE:
            out.append(_DOUBLE_TAG + struct.pack("<d", value))
        elif kind == ex.BOOL:
            out.append(_BOOLS[bool(value)])
        else:
            out.append(ValueProto(**{VALUE_FIELDS[kind]: convert(value)}).SerializeToString())
    if not with_text:
        return out, []
    texts = [None if null else str(convert(v)) for v, null in zip(values, nulls, strict=True)]
    return out, texts


class ViewLayout:
    """Where a view's values live: its entity keys, hash fields and table."""

    def __init__(
        self,
        project: str,
        view: str,
        join_keys: Sequence[str],
        key_kinds: Sequence[str],
        features: dict[str, str],
        ttl: timedelta | None,
    ) -> None:
        self.project = project
        self.view = view
        self.join_keys = tuple(join_keys)
        self.features = dict(features)  # name -> DSL kind
        self.ttl_seconds = ttl.total_seconds() if ttl else 0.0
        order = sorted(range(len(join_keys)), key=lambda i: join_keys[i])
        self._order = order
        self._key_kinds = [key_kinds[i] for i in order]
        header = [struct.pack("<I", len(order))]
        for i in order:
            name = join_keys[i].encode()
            header.append(struct.pack("<II", _KEY_STRING, len(name)) + name)
        self._header = b"".join(header)
        self._project = project.encode()
        self.fields = {f: redis_field(view, f) for f in features}
        self.ts_field = f"_ts:{view}".encode()
        self.table = f"{project}_{view}"

    def entity_key(self, values: Sequence[Any]) -> bytes:
        """Feast's serialized entity key (v3) of the join key values, given
        in the order of ``join_keys``."""
        parts = [self._header]
        for i, kind in zip(self._order, self._key_kinds, strict=True):
            value = values[i]
            if kind == ex.INT64:
                parts.append(struct.pack("<IIq", _KEY_INT64, 8, int(value)))
            else:
                data = str(value).encode()
                parts.append(struct.pack("<II", _KEY_STRING, len(data)) + data)
        return b"".join(parts)

    def redis_key(self, values: Sequence[Any]) -> bytes:
        return self.entity_key(values) + self._project


@dataclass
class ViewRows:
    """One read of a view, still serialized. Per entity: ``stamps`` its
    event time as Timestamp bytes (None: the entity has no row), ``seconds``
    the same as epoch seconds, ``stale`` whether that is older than the
    view's ttl; ``values`` per entity and requested feature the feast Value
    bytes (None: not stored).

    A value's status: NOT_FOUND when the entity has no row or the row no
    value of the feature; else OUTSIDE_MAX_AGE when the row is stale; else
    NULL or PRESENT as the stored Value is empty or not. ``online_values``
    and the servicer's response bytes both follow it."""

    features: list[str]
    stamps: list[bytes | None]
    seconds: list[float]
    stale: list[bool]
    values: list[list[bytes | None]]

    def online_values(self) -> list[list[OnlineValue]]:
        out = []
        for stamp, stale, raws in zip(self.stamps, self.stale, self.values, strict=True):
            if stamp is None:
                out.append([OnlineValue(None, NOT_FOUND, None) for _ in raws])
                continue
            when = stamp_datetime(stamp)
            row = []
            for raw in raws:
                if raw is None:
                    row.append(OnlineValue(None, NOT_FOUND, None))
                elif stale:
                    row.append(OnlineValue(None, OUTSIDE_MAX_AGE, when))
                else:
                    value = decode_value(raw)
                    row.append(OnlineValue(value, NULL if value is None else PRESENT, when))
            out.append(row)
        return out


def _rows(
    layout: ViewLayout,
    features: list[str],
    found: list[tuple[bytes | None, float, list[bytes | None]]],
    now: float,
) -> ViewRows:
    ttl = layout.ttl_seconds
    return ViewRows(
        features=features,
        stamps=[stamp for stamp, _, _ in found],
        seconds=[seconds for _, seconds, _ in found],
        stale=[
            bool(ttl) and stamp is not None and now - seconds > ttl for stamp, seconds, _ in found
        ],
        values=[values for _, _, values in found],
    )


# ---- Redis ----------------------------------------------------------------------------------


@functools.cache
def _hiredis_packing_connection() -> type:
    """redis-py's asyncio connection, packing commands with hiredis' C
    packer (the asyncio one packs in Python, argument by argument: a read's
    100 HMGETs took about a millisecond to pack)."""
    from redis import asyncio as redis_asyncio
    from redis.utils import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:  # pragma: no cover - a dependency of this package
        return redis_asyncio.Connection
    import hiredis

    class HiredisPackingConnection(redis_asyncio.Connection):
        def pack_command(self, *args: Any) -> list[bytes]:
            if isinstance(args[0], str) and " " in args[0]:
                return super().pack_command(*args)  # "CLIENT SETINFO" and the like
            return [hiredis.pack_command(args)]

    return HiredisPackingConnection


class RedisLayout:
    """Feast's Redis layout on one Redis database: a blocking client for the
    store's thread (writes, synchronous reads) and an asyncio client with
    its own pool for the event loop's reads, made on first use in the loop
    that uses it."""

    needs_text = False  # WriteRows' texts: SQLite's value_text only

    def __init__(self, connection_string: str, key_ttl_seconds: int | None, timeout_s: float):
        from feast.infra.online_stores.redis import RedisOnlineStore

        nodes, params = RedisOnlineStore._parse_connection_string(connection_string)
        self._kwargs = {
            **params,
            "host": nodes[0]["host"],
            "port": int(nodes[0]["port"]),
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        }
        self.key_ttl_seconds = key_ttl_seconds
        self.timeout_s = timeout_s
        self._sync: Any = None
        self._async: Any = None
        self._async_loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def _retry() -> Any:
        # One immediate retry (a pooled connection that Redis closed), not
        # redis-py's default of three with backoff: a Redis that is down is
        # reported at once and the caller retries.
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return Retry(NoBackoff(), 1)

    def client(self) -> Any:
        if self._sync is None:
            import redis

            self._sync = redis.Redis(**self._kwargs, retry=self._retry())
        return self._sync

    def async_client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async_loop is not loop:
            from redis import asyncio as redis_asyncio

            # No socket_timeout: redis-py would arm a timer for each of a
            # pipeline's replies; aread bounds the whole round trip once.
            pool = redis_asyncio.BlockingConnectionPool(
                connection_class=_hiredis_packing_connection(),
                max_connections=64,
                timeout=self.timeout_s,
                **{**self._kwargs, "socket_timeout": None},
            )
            self._async = redis_asyncio.Redis(connection_pool=pool, retry=self._retry())
            self._async_loop = loop
        return self._async

    def _commands(
        self, layout: ViewLayout, features: list[str], entities: Sequence[Sequence[Any]]
    ) -> tuple[list[bytes], list[bytes]]:
        fields = [layout.fields[f] for f in features] + [layout.ts_field]
        return [layout.redis_key(e) for e in entities], fields

    @staticmethod
    def _found(replies: list[list[bytes | None]]) -> list[tuple[bytes | None, float, list[Any]]]:
        found: list[tuple[bytes | None, float, list[Any]]] = []
        for reply in replies:
            stamp = reply.pop()
            if stamp is None:
                found.append((None, 0.0, reply))
            else:
                found.append((stamp, stamp_ns(stamp) / 1e9, reply))
        return found

    def read(
        self, layout: ViewLayout, features: list[str], entities: Sequence[Sequence[Any]]
    ) -> ViewRows:
        keys, fields = self._commands(layout, features, entities)
        with self.client().pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, fields)
            replies = pipe.execute()
        return _rows(layout, features, self._found(replies), time.time())

    async def aread(
        self, layout: ViewLayout, features: list[str], entities: Sequence[Sequence[Any]]
    ) -> ViewRows:
        keys, fields = self._commands(layout, features, entities)
        async with (
            asyncio.timeout(self.timeout_s),
            self.async_client().pipeline(transaction=False) as pipe,
        ):
            for key in keys:
                pipe.hmget(key, fields)
            replies = await pipe.execute()
        return _rows(layout, features, self._found(replies), time.time())

    def write(self, layout: ViewLayout, rows: WriteRows) -> int:
        """Writes each row whose event time is newer than the stored one
        (Feast's rule); the rows written."""
        written = 0
        fields = [layout.fields[f] for f in rows.features]
        for start in range(0, len(rows.keys), _PIPELINE_CHUNK):
            chunk = range(start, min(start + _PIPELINE_CHUNK, len(rows.keys)))
            keys = [layout.redis_key(rows.keys[i]) for i in chunk]
            stored = self._pipeline([(b"HGET", key, layout.ts_field) for key in keys])
            commands: list[tuple[bytes, ...]] = []
            for key, i, previous in zip(keys, chunk, stored, strict=True):
                if previous is not None and stamp_ns(previous) >= rows.nanos[i]:
                    continue
                pairs = [item for pair in zip(fields, rows.values[i], strict=True) for item in pair]
                commands.append((b"HSET", key, *pairs, layout.ts_field, rows.stamps[i]))
                if self.key_ttl_seconds:
                    commands.append((b"EXPIRE", key, str(self.key_ttl_seconds).encode()))
                written += 1
            if commands:
                self._pipeline(commands)
        return written

    def _pipeline(self, commands: list[tuple[bytes, ...]]) -> list[Any]:
        """``commands`` in one round trip, packed by hiredis into one buffer
        (redis-py's pipeline packs argument by argument in Python: a third of
        a 20-feature write's time); their replies. Idempotent writes and
        reads only: a pooled connection Redis had closed is retried once."""
        import hiredis
        import redis

        # (hiredis' stubs type its argument as a 1-tuple: any length is packed)
        pack: Any = hiredis.pack_command
        packed = b"".join(pack(command) for command in commands)
        pool = self.client().connection_pool
        for attempt in range(2):
            connection = pool.get_connection()
            try:
                connection.send_packed_command([packed])
                return [connection.read_response() for _ in commands]
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                connection.disconnect()
                if attempt:
                    raise
            finally:
                pool.release(connection)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._async is not None and self._async_loop is asyncio.get_running_loop():
            await self._async.aclose(close_connection_pool=True)
        self._async = None
        if self._sync is not None:
            self._sync.close()
            self._sync = None


# ---- SQLite ---------------------------------------------------------------------------------


def _to_sqlite_ts(epoch_ns: int) -> int:
    """``event_ts`` as Feast's sqlite3 adapter stores it: whole seconds of
    the naive UTC time read as local time."""
    naive = (_EPOCH + timedelta(microseconds=epoch_ns // 1000)).replace(tzinfo=None)
    return int(naive.timestamp())


def _from_sqlite_ts(stored: Any) -> int:
    if isinstance(stored, (bytes, str)):  # an ISO text, from another adapter
        text = stored.decode() if isinstance(stored, bytes) else stored
        when = datetime.fromisoformat(text)
    else:
        when = datetime.fromtimestamp(int(stored))  # local, naive: the UTC time
    return int(when.replace(tzinfo=UTC).timestamp())


class SqliteLayout:
    """Feast's SQLite layout in one database file: reads on read-only
    connections, one per thread of a small pool; writes on one connection of
    the caller's thread (the store's)."""

    needs_text = True

    def __init__(self, path: str, timeout_s: float, readers: int = 4) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(readers, thread_name_prefix="sqlite")
        self._writer: sqlite3.Connection | None = None
        self._readers: list[sqlite3.Connection] = []
        self.writer()  # WAL mode from the start: readers never wait for a writer

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                f"file:{self.path}?mode=ro",
                uri=True,
                timeout=self.timeout_s,
                check_same_thread=False,
            )
            self._local.conn = conn
            self._readers.append(conn)
        return conn

    def writer(self) -> sqlite3.Connection:
        if self._writer is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, check_same_thread=False)
            # WAL: readers see the last commit while a write goes on.
            conn.execute("PRAGMA journal_mode=WAL")
            self._writer = conn
        return self._writer

    def read(
        self, layout: ViewLayout, features: list[str], entities: Sequence[Sequence[Any]]
    ) -> ViewRows:
        keys = [layout.entity_key(e) for e in entities]
        wanted = sorted(set(keys))
        table = '"' + layout.table.replace('"', '""') + '"'
        query = (
            f"SELECT entity_key, feature_name, value, event_ts FROM {table} "
            f"WHERE entity_key IN ({','.join('?' * len(wanted))}) "
            f"AND feature_name IN ({','.join('?' * len(features))})"
        )
        by_key: dict[bytes, tuple[Any, dict[str, bytes]]] = {}
        for key, feature, value, stored in self._reader().execute(query, [*wanted, *features]):
            entry = by_key.get(key)
            if entry is None:
                entry = by_key[key] = (stored, {})
            elif stored is not None and (entry[0] is None or stored > entry[0]):
                by_key[key] = entry = (stored, entry[1])
            entry[1][feature] = value
        found: list[tuple[bytes | None, float, list[Any]]] = []
        stamps: dict[Any, tuple[bytes, float]] = {}
        for key in keys:
            entry = by_key.get(key)
            if entry is None:
                found.append((None, 0.0, [None] * len(features)))
                continue
            stored, values = entry
            stamp = stamps.get(stored)
            if stamp is None:
                seconds = _from_sqlite_ts(stored) if stored is not None else 0
                stamp = stamps[stored] = (timestamp_bytes(seconds * 1_000_000_000), seconds)
            found.append((stamp[0], stamp[1], [values.get(f) for f in features]))
        return _rows(layout, features, found, time.time())

    async def aread(
        self, layout: ViewLayout, features: list[str], entities: Sequence[Sequence[Any]]
    ) -> ViewRows:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.read, layout, features, entities)

    def write(self, layout: ViewLayout, rows: WriteRows) -> int:
        """Upserts every row, as Feast's online_write_batch does, except over
        a stored row with a newer event time; the rows."""
        table = '"' + layout.table.replace('"', '""') + '"'
        sql = (
            f"INSERT INTO {table} (entity_key, feature_name, value, value_text, event_ts, "
            "created_ts) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO "
            "UPDATE SET value = excluded.value, value_text = excluded.value_text, "
            "event_ts = excluded.event_ts, created_ts = excluded.created_ts "
            f"WHERE excluded.event_ts >= {table}.event_ts"
        )
        params = []
        for i, key_values in enumerate(rows.keys):
            key = layout.entity_key(key_values)
            stored = _to_sqlite_ts(rows.nanos[i])
            for j, feature in enumerate(rows.features):
                params.append((key, feature, rows.values[i][j], rows.texts[i][j], stored, None))
        conn = self.writer()
        with conn:
            conn.executemany(sql, params)
        return len(rows.keys)

    async def close(self) -> None:
        def close_all() -> None:
            self._pool.shutdown(wait=True)
            for conn in [*self._readers, self._writer]:
                if conn is not None:
                    conn.close()
            self._readers.clear()
            self._writer = None

        await asyncio.to_thread(close_all)


# ---- rows to write ---------------------------------------------------------------------------


@dataclass
class WriteRows:
    """Rows to write, encoded once for either store: per row the join key
    values, the event time (epoch nanoseconds, to the microsecond as Feast
    keeps it, and Timestamp bytes), and per
    feature the feast Value bytes and their text."""

    features: list[str]
    keys: list[tuple[Any, ...]]
    nanos: list[int]
    stamps: list[bytes]
    values: list[list[bytes]]
    texts: list[list[str | None]]

    @classmethod
    def from_frame(
        cls, layout: ViewLayout, frame: pd.DataFrame, time_column: str, with_text: bool
    ) -> WriteRows:
        features = [f for f in layout.features if f in frame.columns]
        times = pd.to_datetime(frame[time_column], utc=True).dt.as_unit("ns")
        nanos = [ns // 1000 * 1000 for ns in times.astype("int64").tolist()]
        encoded = [encode_column(layout.features[f], frame[f], with_text) for f in features]
        keys = list(zip(*(frame[k].tolist() for k in layout.join_keys), strict=True))
        empty: list[list[Any]] = [[] for _ in keys]
        return cls(
            features=features,
            keys=keys,
            nanos=nanos,
            stamps=[timestamp_bytes(ns) for ns in nanos],
            values=[list(r) for r in zip(*(v for v, _ in encoded), strict=True)] or empty,
            texts=[list(r) for r in zip(*(t for _, t in encoded), strict=True)] or empty
            if with_text
            else empty,
        )

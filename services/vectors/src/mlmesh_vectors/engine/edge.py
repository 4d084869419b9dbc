"""Qdrant's engine in process (``qdrant-edge-py``): one shard per collection
on local disk.

Layout under ``root``::

    collections/<name>/collection.json   the CollectionSpec (JSON)
    collections/<name>/shard/            the engine's shard (segments, WAL)
    collections/<name>/snapshots/*.tar   snapshots

Every change to that tree is made under a name starting with '.' and renamed
into place, so a killed process leaves a whole collection or none. On open,
``.incoming-<name>`` (a whole collection waiting to replace ``<name>``) and
``<name>/.shard-new`` (a whole shard waiting to replace ``shard/``) are
renamed in if what they replace is gone; every other '.' entry is debris of an
unfinished operation and is removed.

Durability: the engine writes each update to its WAL before applying it, so a
returned write survives SIGKILL (not power loss: nothing is fsynced). A batch
of up to ``max_points_per_update`` points is one engine operation, one WAL
entry, so a killed process never leaves part of one. A write that fails is
undone (the previous records of its ids written back, the new ids deleted)
and raises ``EngineUnavailable``.

Indexing. The engine builds HNSW only when asked (``optimize()``), and holds
the GIL while it does, as it does in every call (measured for query, update
and optimize): in process, building 10k x 384 takes 2.5 s (100k: ~86 s) on
this 2-core machine, during which no thread of the service would run, gRPC's
event loop included. So the build runs in a child process on a copy of the
shard: once a collection's unindexed vectors reach ``indexing_threshold_kb``
(Qdrant's default, 10 MB: ~6.7k points of 384-d), a background thread
flushes the shard and copies it (under the collection's write lock), lets
the child build the index on the copy while reads and writes go on against
the live shard, then, under the write lock, repeats on the copy the writes
made meanwhile (kept in memory until then) and swaps it in; readers wait for
the swap only. Until then, unindexed points are searched exactly. Measured
for 10k x 384: 3.1 s from start to swap, the service's threads stalled at
most ~70 ms (loading and swapping the copy), searches meanwhile 1.3 ms
(p50; the child takes the cores); then 0.5 ms through the index (ef 64)
against 0.6 ms exact. The child dies with the service (PR_SET_PDEATHSIG on
Linux); a copy left by a killed process is removed on open.

Concurrency: writes to a collection take its lock; reads take no lock
against each other or against writes (the engine is safe for that: each
call holds the GIL, so calls never overlap inside it). Replacing a shard
(index swap, restore) or closing it waits for the calls using it.

Snapshots are uncompressed tars (a ``snapshot.json`` manifest, then
collection.json and shard/), written to a temporary name under the write
lock after a flush, then renamed. The engine preallocates files (WAL
segments and vector and payload pages of 32 MiB, index pages of 1 MiB) that
are mostly zeros; a file ending in zeros is stored as a GNU sparse member
(the trailing zeros become a hole), which Python's tarfile and GNU tar both
restore, so a small collection's snapshot is under a megabyte, not 128 MB.
Restoring unpacks into a temporary folder and swaps the shard in as an index
build does.

Engine quirks worked around here: ``MatchValue(True)`` is read as the
integer 1 and matches no bool, so bools are passed as ``numpy.bool_``; a
quantized search does not rescore with the original vectors unless asked, so
``rescore=True`` is always sent.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import qdrant_edge as qe

from mlmesh_vectors.engine.base import (
    FULL_SCAN_THRESHOLD_KB,
    ID_KEY,
    Batch,
    CollectionExists,
    CollectionNotFound,
    CollectionSpec,
    CollectionState,
    Condition,
    Distance,
    EngineUnavailable,
    Filter,
    Hit,
    PayloadType,
    PointNotFound,
    QuantizationKind,
    Query,
    Record,
    SearchOptions,
    SnapshotInfo,
    SnapshotNotFound,
    engine_id,
    spec_from_json,
    spec_to_json,
)

log = logging.getLogger(__name__)

# What the engine takes as point ids (engine_id gives UUID strings).
_PointIds = list[int | uuid.UUID | str]

SPEC_FILE = "collection.json"
SHARD_DIR = "shard"
SNAPSHOTS_DIR = "snapshots"
SNAPSHOT_MANIFEST = "snapshot.json"
_NEW_SHARD = ".shard-new"
_OLD_SHARD = ".shard-old"
_INCOMING = ".incoming-"

# Collection names the backend accepts (the servicer's, and its reserved
# ones starting with '_'); nothing that could leave the collections folder.
_COLLECTION_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,62}$")
_SNAPSHOT_NAME = re.compile(r"^\d{8}T\d{12}-[0-9a-f]{6}$")

_DISTANCES = {
    Distance.COSINE: qe.Distance.Cosine,
    Distance.DOT: qe.Distance.Dot,
    Distance.EUCLID: qe.Distance.Euclid,
    Distance.MANHATTAN: qe.Distance.Manhattan,
}
_SCHEMAS: dict[PayloadType, qe.PayloadSchemaType] = {
    "keyword": qe.PayloadSchemaType.Keyword,
    "integer": qe.PayloadSchemaType.Integer,
    "float": qe.PayloadSchemaType.Float,
    "bool": qe.PayloadSchemaType.Bool,
}
# Payload to fetch when the caller wants none: only the caller's id.
_ID_ONLY = qe.PayloadSelector.Include([ID_KEY])

# The child process that builds a copy's HNSW index (argv: the copy, the
# service's pid). It asks the kernel to kill it when the thread that started
# it dies, and gives up if the service died before it could ask.
_BUILD_PROGRAM = """
import ctypes, os, signal, sys
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[2]):
        sys.exit(3)
import qdrant_edge
shard = qdrant_edge.EdgeShard.load(sys.argv[1])
shard.optimize()
shard.flush()
shard.close()
"""

_BLOCK = 1 << 16
_ZEROS = bytes(_BLOCK)
# A file ending in at least this many zero bytes goes into a tar as sparse.
_SPARSE_MIN = 1 << 16


class _ShardGuard:
    """Any number of calls using a collection's shard at once, or one
    replacing (or closing) it; a waiting replacer holds off new users."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._replacing = False

    @contextmanager
    def use(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._replacing)
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    @contextmanager
    def replace(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._replacing)
            self._replacing = True
            self._cond.wait_for(lambda: self._users == 0)
        try:
            yield
        finally:
            with self._cond:
                self._replacing = False
                self._cond.notify_all()


@dataclass(eq=False)
class _Collection:
    spec: CollectionSpec
    path: Path
    shard: qe.EdgeShard
    # Held by every write, and while the shard is copied, swapped or closed.
    write_lock: threading.Lock
    guard: _ShardGuard
    closed: bool = False
    # Set when the collection closes: a running index build gives up.
    stopping: bool = False
    # One more each time the shard is replaced; a build started from an
    # older shard is thrown away.
    generation: int = 0
    # Writes applied while a copy is being indexed, to repeat on the copy.
    replay: list[qe.UpdateOperation] | None = None
    builder: threading.Thread | None = None
    build_process: subprocess.Popen[bytes] | None = None
    # Unindexed points a build left (in segments below the threshold): the
    # next build starts once the unindexed points grow by the threshold.
    unindexed_floor: int = 0


class EdgeBackend:
    """``VectorBackend`` on qdrant-edge (see the module docstring).

    ``indexing_threshold_kb``: unindexed vectors (KB) that start an index
    build; ``full_scan_threshold_kb``: filters matching fewer vectors (KB)
    are searched exactly (engine/base.py ``FULL_SCAN_THRESHOLD_KB``);
    ``auto_index=False`` never starts one (a read replica, which installs
    its primary's indexed snapshots).

    Test hooks: ``max_points_per_update`` splits a batch into several engine
    operations, and ``fault_hook`` (if set) is called between two of them; an
    exception it raises is an engine failure part-way through the write.
    """

    def __init__(
        self,
        root: Path,
        *,
        default_ef: int = 64,
        max_search_threads: int | None = 1,
        indexing_threshold_kb: int = 10_000,
        full_scan_threshold_kb: int = FULL_SCAN_THRESHOLD_KB,
        auto_index: bool = True,
    ) -> None:
        self._root = Path(root)
        self._dir = self._root / "collections"
        self._default_ef = default_ef
        self._max_search_threads = max_search_threads
        self._threshold_kb = indexing_threshold_kb
        self._full_scan_kb = full_scan_threshold_kb
        self._auto_index = auto_index
        self.max_points_per_update = 1000
        self.fault_hook: Callable[[], None] | None = None
        self._registry = threading.Lock()
        self._collections: dict[str, _Collection] = {}
        self._dir.mkdir(parents=True, exist_ok=True)
        self._recover()
        try:
            for path in sorted(p for p in self._dir.iterdir() if p.is_dir()):
                col = self._open(path)
                self._collections[col.spec.name] = col
                with col.write_lock:
                    self._maybe_index(col)
        except BaseException:
            self.close()  # release the shards opened so far
            raise

    # --- collections ---

    def create_collection(self, spec: CollectionSpec) -> CollectionSpec:
        if not _COLLECTION_NAME.match(spec.name):
            raise ValueError(f"invalid collection name {spec.name[:70]!r}")
        with self._registry:
            if spec.name in self._collections:
                raise CollectionExists(spec.name)
            spec = replace(spec, create_time=datetime.now(UTC))
            staging = self._dir / f".create-{secrets.token_hex(4)}"
            try:
                staging.mkdir()
                (staging / SNAPSHOTS_DIR).mkdir()
                (staging / SPEC_FILE).write_text(json.dumps(spec_to_json(spec)))
                shard = qe.EdgeShard.create(str(staging / SHARD_DIR), self._config(spec))
                try:
                    for key, kind in spec.payload_indexes:
                        shard.update(qe.UpdateOperation.create_field_index(key, _SCHEMAS[kind]))
                    shard.flush()
                finally:
                    shard.close()
                staging.rename(self._dir / spec.name)
            except Exception as exc:
                _remove(staging)
                raise EngineUnavailable(f"could not create collection {spec.name}") from exc
            self._collections[spec.name] = self._open(self._dir / spec.name)
        return spec

    def spec(self, name: str) -> CollectionSpec:
        """From memory: a dict lookup."""
        return self._get(name).spec

    def get_collection(self, name: str) -> CollectionState:
        col = self._get(name)
        with self._using(col) as shard:
            info = shard.info()
        return CollectionState(
            spec=col.spec,
            point_count=info.points_count,
            indexed_point_count=min(info.indexed_vectors_count, info.points_count),
            indexing=col.builder is not None,
        )

    def list_collections(self) -> list[CollectionSpec]:
        with self._registry:
            return [self._collections[name].spec for name in sorted(self._collections)]

    def delete_collection(self, name: str) -> bool:
        with self._registry:
            col = self._collections.pop(name, None)
            if col is None:
                return False
            self._close(col)
            trash = self._dir / f".delete-{secrets.token_hex(4)}"
            col.path.rename(trash)
        _remove(trash)
        return True

    # --- points ---

    def upsert(self, collection: str, batch: Batch) -> int:
        col = self._get(collection)
        ids: _PointIds = [engine_id(point_id) for point_id in batch.ids]
        payloads = batch.payloads or [{} for _ in batch.ids]
        points = [
            qe.Point(id=eid, vector=vector, payload={**payload, ID_KEY: point_id})
            for eid, point_id, vector, payload in zip(
                ids, batch.ids, batch.vectors.tolist(), payloads, strict=True
            )
        ]
        step = self.max_points_per_update
        with col.write_lock, self._using(col) as shard:
            previous = shard.retrieve(ids, with_payload=True, with_vector=True)
            try:
                for start in range(0, len(points), step):
                    if start and self.fault_hook is not None:
                        self.fault_hook()
                    self._apply(col, qe.UpdateOperation.upsert_points(points[start : start + step]))
            except Exception as exc:
                self._undo(col, ids, previous)
                raise EngineUnavailable(f"upsert to {collection} failed; undone") from exc
            self._maybe_index(col)
        return len(points)

    def retrieve(
        self, collection: str, ids: Sequence[str], with_payload: bool, with_vector: bool
    ) -> list[Record]:
        col = self._get(collection)
        wanted: _PointIds = [engine_id(point_id) for point_id in ids]
        with self._using(col) as shard:
            found = shard.retrieve(
                wanted,
                with_payload=True if with_payload else _ID_ONLY,
                with_vector=with_vector,
            )
        records = {r.id: r for r in (_record(f, with_payload) for f in found)}
        return [records[point_id] for point_id in ids if point_id in records]

    def delete_ids(self, collection: str, ids: Sequence[str]) -> int:
        col = self._get(collection)
        with col.write_lock, self._using(col) as shard:
            wanted: _PointIds = [engine_id(point_id) for point_id in set(ids)]
            found = shard.retrieve(wanted, with_payload=False, with_vector=False)
            if found:
                self._write(col, qe.UpdateOperation.delete_points([r.id for r in found]))
        return len(found)

    def delete_by_filter(self, collection: str, filter: Filter) -> int:
        col = self._get(collection)
        edge_filter = _edge_filter(filter) or qe.Filter()
        with col.write_lock, self._using(col) as shard:
            matching = shard.count(qe.CountRequest(exact=True, filter=edge_filter))
            if matching:
                self._write(col, qe.UpdateOperation.delete_points_by_filter(edge_filter))
        return matching

    def count(self, collection: str, filter: Filter | None = None) -> int:
        col = self._get(collection)
        with self._using(col) as shard:
            return shard.count(qe.CountRequest(exact=True, filter=_edge_filter(filter)))

    def search(
        self, collection: str, queries: Sequence[Query], options: SearchOptions
    ) -> list[list[Hit]]:
        """Several queries are one ``query_batch`` (planned and run together
        by the engine); what they share (search parameters, the payload
        selector, a filter object several queries hold) is made once."""
        col = self._get(collection)
        settings = self._search_settings(col.spec, options)
        # The engine's filter of each distinct Filter object (the servicer
        # hands one object to every query of a batch with the same filter).
        filters: dict[int, qe.Filter | None] = {}
        requests = []
        for query in queries:
            key = id(query.filter)
            if key not in filters:
                filters[key] = _edge_filter(query.filter)
            requests.append(_request(query.vector, query, filters[key], settings, options))
        with self._using(col) as shard:
            if len(requests) == 1:
                results = [shard.query(requests[0])]
            else:
                results = shard.query_batch(qe.QueryBatchRequest(requests))
        if options.with_payload or options.with_vector:
            return [[_hit(point, options) for point in points] for points in results]
        # Ids and scores only: the payload holds the caller's id alone.
        return [
            [Hit(p.payload[ID_KEY], p.score) for p in points]  # type: ignore[index]
            for points in results
        ]

    def recommend(
        self,
        collection: str,
        positive: Sequence[str],
        negative: Sequence[str],
        query: Query,
        options: SearchOptions,
    ) -> list[Hit]:
        col = self._get(collection)
        examples = {point_id: engine_id(point_id) for point_id in [*positive, *negative]}
        with self._using(col) as shard:
            wanted: _PointIds = list(examples.values())
            found = shard.retrieve(wanted, with_payload=_ID_ONLY, with_vector=True)
            vectors = {(f.payload or {})[ID_KEY]: np.asarray(f.vector, np.float32) for f in found}
            missing = next((point_id for point_id in examples if point_id not in vectors), None)
            if missing is not None:
                raise PointNotFound(missing)
            # Qdrant's average-vector strategy.
            target = np.mean([vectors[p] for p in positive], axis=0)
            if negative:
                target = target + target - np.mean([vectors[n] for n in negative], axis=0)
            edge_filter = _edge_filter(query.filter, examples.values())
            settings = self._search_settings(col.spec, options)
            request = _request(target, query, edge_filter, settings, options)
            points = shard.query(request)
        return [_hit(point, options) for point in points]

    def scroll(
        self,
        collection: str,
        offset: str | None,
        limit: int,
        filter: Filter | None,
        with_payload: bool,
        with_vector: bool,
    ) -> tuple[list[Record], str | None]:
        """``offset`` is an engine id; ValueError if it is not a UUID."""
        col = self._get(collection)
        request = qe.ScrollRequest(
            offset=None if offset is None else str(uuid.UUID(offset)),
            limit=limit,
            filter=_edge_filter(filter),
            with_payload=True if with_payload else _ID_ONLY,
            with_vector=with_vector,
        )
        with self._using(col) as shard:
            found, next_offset = shard.scroll(request)
        records = [_record(r, with_payload) for r in found]
        return records, None if next_offset is None else str(next_offset)

    # --- snapshots ---

    def create_snapshot(self, collection: str) -> SnapshotInfo:
        col = self._get(collection)
        with col.write_lock, self._using(col) as shard:
            now = datetime.now(UTC)
            name = f"{now:%Y%m%dT%H%M%S%f}-{secrets.token_hex(3)}"
            shard.flush()
            point_count = shard.count(qe.CountRequest(exact=True))
            manifest = {
                "name": name,
                "collection": collection,
                "point_count": point_count,
                "create_time": now.isoformat(),
            }
            final = col.path / SNAPSHOTS_DIR / f"{name}.tar"
            partial = final.with_name(f".{final.name}")
            try:
                with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
                    member = tarfile.TarInfo(SNAPSHOT_MANIFEST)
                    data = json.dumps(manifest).encode()
                    member.size, member.mtime = len(data), int(now.timestamp())
                    tar.addfile(member, io.BytesIO(data))
                    tar.add(col.path / SPEC_FILE, arcname=SPEC_FILE)
                    _add_tree(tar, col.path / SHARD_DIR, SHARD_DIR)
                partial.rename(final)
            except BaseException:
                _remove(partial)
                raise
        return SnapshotInfo(name, collection, point_count, final.stat().st_size, now)

    def list_snapshots(self, collection: str) -> list[SnapshotInfo]:
        col = self._get(collection)
        found = []
        for path in (col.path / SNAPSHOTS_DIR).glob("*.tar"):
            if _SNAPSHOT_NAME.match(path.stem):
                try:
                    found.append(_snapshot_info(path))
                except FileNotFoundError:  # deleted meanwhile
                    continue
        return sorted(found, key=lambda s: (s.create_time, s.name), reverse=True)

    def snapshot_path(self, collection: str, snapshot: str) -> Path:
        """The snapshot's tar (to ship it to a replica). SnapshotNotFound."""
        col = self._get(collection)
        path = col.path / SNAPSHOTS_DIR / f"{snapshot}.tar"
        if not _SNAPSHOT_NAME.match(snapshot) or not path.is_file():
            raise SnapshotNotFound(collection, snapshot)
        return path

    def restore_snapshot(self, collection: str, snapshot: str) -> CollectionState:
        path = self.snapshot_path(collection, snapshot)
        col = self._get(collection)
        with col.write_lock:
            self._check_open(col)
            staging = col.path / f".restore-{secrets.token_hex(4)}"
            try:
                _extract(path, staging)
                (staging / SHARD_DIR).rename(col.path / _NEW_SHARD)
            finally:
                _remove(staging)
            self._swap_in_new_shard(col)
            col.unindexed_floor = 0
            self._maybe_index(col)
        return self.get_collection(collection)

    def delete_snapshot(self, collection: str, snapshot: str) -> None:
        try:
            self.snapshot_path(collection, snapshot).unlink()
        except FileNotFoundError:
            raise SnapshotNotFound(collection, snapshot) from None

    def install_snapshot_file(self, path: Path, name: str | None = None) -> CollectionState:
        """Creates, or replaces wholesale (its snapshots included), collection
        ``name`` (default: the snapshot's) from a snapshot tar, e.g. one a
        read replica fetched from its primary. ValueError for a file that is
        not a snapshot."""
        staging = self._dir / f".install-{secrets.token_hex(4)}"
        try:
            _extract(Path(path), staging)
            spec = spec_from_json(json.loads((staging / SPEC_FILE).read_text()))
            spec = replace(spec, name=name or spec.name)
            if not _COLLECTION_NAME.match(spec.name):
                raise ValueError(f"invalid collection name {spec.name[:70]!r}")
            (staging / SPEC_FILE).write_text(json.dumps(spec_to_json(spec)))
            (staging / SNAPSHOT_MANIFEST).unlink(missing_ok=True)
            (staging / SNAPSHOTS_DIR).mkdir()
            target = self._dir / spec.name
            with self._registry:
                old = self._collections.pop(spec.name, None)
                if old is None:
                    staging.rename(target)
                else:
                    self._close(old)
                    incoming = self._dir / f"{_INCOMING}{spec.name}"
                    staging.rename(incoming)
                    replaced = self._dir / f".replaced-{secrets.token_hex(4)}"
                    target.rename(replaced)
                    incoming.rename(target)
                    _remove(replaced)
                col = self._open(target)
                self._collections[spec.name] = col
                with col.write_lock:
                    self._maybe_index(col)
        finally:
            _remove(staging)
        return self.get_collection(spec.name)

    # --- indexing ---

    def wait_for_indexing(self, collection: str, timeout_s: float = 60.0) -> CollectionState:
        """Waits (at most ``timeout_s``) for the collection's running index
        builds to end; its state then."""
        col = self._get(collection)
        deadline = time.monotonic() + timeout_s
        while (builder := col.builder) is not None and time.monotonic() < deadline:
            builder.join(deadline - time.monotonic())
        return self.get_collection(collection)

    def close(self) -> None:
        with self._registry:
            collections, self._collections = list(self._collections.values()), {}
            for col in collections:
                self._close(col)

    # --- internals ---

    def _config(self, spec: CollectionSpec) -> qe.EdgeConfig:
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=spec.dimension, distance=_DISTANCES[spec.distance]),
            hnsw_config=qe.HnswIndexConfig(
                m=spec.hnsw_m,
                ef_construct=spec.hnsw_ef_construct,
                # Filters matching fewer vectors than this are searched
                # exactly (engine/base.py FULL_SCAN_THRESHOLD_KB).
                full_scan_threshold=self._full_scan_kb,
            ),
            quantization_config=_quantization(spec.quantization),
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=self._threshold_kb),
            max_search_threads=self._max_search_threads,
        )

    def _recover(self) -> None:
        """Finishes or clears what a killed process left (module docstring)."""
        for entry in sorted(self._dir.iterdir()):
            name = entry.name
            if name.startswith(_INCOMING) and not (self._dir / name[len(_INCOMING) :]).exists():
                entry.rename(self._dir / name[len(_INCOMING) :])
            elif name.startswith("."):
                _remove(entry)
        for path in self._dir.iterdir():
            if not path.is_dir():
                continue
            if not (path / SHARD_DIR).exists() and (path / _NEW_SHARD).exists():
                (path / _NEW_SHARD).rename(path / SHARD_DIR)
            (path / SNAPSHOTS_DIR).mkdir(exist_ok=True)
            for entry in [*path.iterdir(), *(path / SNAPSHOTS_DIR).iterdir()]:
                if entry.name.startswith("."):
                    _remove(entry)

    def _open(self, path: Path) -> _Collection:
        spec = spec_from_json(json.loads((path / SPEC_FILE).read_text()))
        shard = qe.EdgeShard.load(str(path / SHARD_DIR), self._config(spec))
        return _Collection(spec, path, shard, threading.Lock(), _ShardGuard())

    def _get(self, name: str) -> _Collection:
        with self._registry:
            col = self._collections.get(name)
        if col is None:
            raise CollectionNotFound(name)
        return col

    @staticmethod
    def _check_open(col: _Collection) -> None:
        if col.closed:
            raise CollectionNotFound(col.spec.name)

    @contextmanager
    def _using(self, col: _Collection) -> Iterator[qe.EdgeShard]:
        with col.guard.use():
            self._check_open(col)
            yield col.shard

    def _apply(self, col: _Collection, operation: qe.UpdateOperation) -> None:
        """Applies a write (write lock held), and keeps it for the copy
        being indexed, if any."""
        col.shard.update(operation)
        if col.replay is not None:
            col.replay.append(operation)

    def _write(self, col: _Collection, operation: qe.UpdateOperation) -> None:
        """A write of one engine operation (all or nothing by itself)."""
        try:
            self._apply(col, operation)
        except Exception as exc:
            raise EngineUnavailable(f"write to {col.spec.name} failed") from exc

    def _undo(self, col: _Collection, ids: _PointIds, previous: list[qe.Record]) -> None:
        """Puts back the records an upsert found, deletes the ids it added."""
        existed = {str(r.id) for r in previous}
        added: _PointIds = [eid for eid in dict.fromkeys(ids) if str(eid) not in existed]
        try:
            if previous:
                points = [
                    qe.Point(id=r.id, vector=r.vector or [], payload=r.payload) for r in previous
                ]
                self._apply(col, qe.UpdateOperation.upsert_points(points))
            if added:
                self._apply(col, qe.UpdateOperation.delete_points(added))
        except Exception:
            log.exception("could not undo a failed upsert to %s", col.spec.name)

    def _search_settings(
        self, spec: CollectionSpec, options: SearchOptions
    ) -> tuple[Any, qe.SearchParams]:
        """The payload selector and search parameters of a query."""
        quantized = spec.quantization != "none"
        params = qe.SearchParams(
            hnsw_ef=options.hnsw_ef or self._default_ef,
            exact=options.exact,
            quantization=qe.QuantizationSearchParams(rescore=True) if quantized else None,
        )
        return (True if options.with_payload else _ID_ONLY), params

    def _threshold_points(self, spec: CollectionSpec) -> int:
        return max(1, math.ceil(self._threshold_kb * 1024 / (4 * spec.dimension)))

    def _unindexed(self, col: _Collection) -> int:
        info = col.shard.info()
        return info.points_count - info.indexed_vectors_count

    def _needs_index(self, col: _Collection) -> bool:
        """Write lock held."""
        if col.closed or col.stopping:
            return False
        unindexed = self._unindexed(col)
        col.unindexed_floor = min(col.unindexed_floor, unindexed)
        return unindexed - col.unindexed_floor >= self._threshold_points(col.spec)

    def _maybe_index(self, col: _Collection) -> None:
        """Starts an index build if one is due (write lock held)."""
        if self._auto_index and col.builder is None and self._needs_index(col):
            col.builder = threading.Thread(
                target=self._index, args=(col,), name=f"index-{col.spec.name}", daemon=True
            )
            col.builder.start()

    def _index(self, col: _Collection) -> None:
        failed = False
        try:
            while self._build_index(col):
                pass
        except Exception:
            log.exception("index build of %s failed", col.spec.name)
            failed = True
        finally:
            with col.write_lock:
                col.builder = None
                col.build_process = None
                col.replay = None
                if failed and not col.closed:
                    # Wait for another threshold of writes before trying again.
                    col.unindexed_floor = self._unindexed(col)
                # A write that came as this thread was ending found it busy.
                self._maybe_index(col)

    def _build_index(self, col: _Collection) -> bool:
        """Builds the index of a copy of the shard and swaps it in; True to
        look again (writes may have come meanwhile)."""
        work = col.path / f".build-{secrets.token_hex(4)}"
        try:
            with col.write_lock:
                if not self._needs_index(col):
                    return False
                generation = col.generation
                col.shard.flush()
                shutil.copytree(col.path / SHARD_DIR, work, copy_function=_copy_sparse)
                col.replay = []
                process = subprocess.Popen(
                    [sys.executable, "-c", _BUILD_PROGRAM, str(work), str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                col.build_process = process
            _, stderr = process.communicate()
            with col.write_lock:
                col.build_process = None
                replay, col.replay = col.replay or [], None
                if col.stopping:
                    return False
                if process.returncode != 0:
                    log.warning(
                        "index build of %s exited with %s: %s",
                        col.spec.name,
                        process.returncode,
                        stderr.decode(errors="replace")[-2000:],
                    )
                    # Wait for another threshold of writes before trying again.
                    col.unindexed_floor = self._unindexed(col)
                    return False
                if col.generation != generation:  # restored meanwhile
                    return True
                built = qe.EdgeShard.load(str(work))
                try:
                    floor = self._unindexed_of(built)
                    for operation in replay:
                        built.update(operation)
                    built.flush()
                finally:
                    built.close()
                work.rename(col.path / _NEW_SHARD)
                self._swap_in_new_shard(col)
                col.unindexed_floor = floor
                return True
        finally:
            _remove(work)

    @staticmethod
    def _unindexed_of(shard: qe.EdgeShard) -> int:
        info = shard.info()
        return info.points_count - info.indexed_vectors_count

    def _swap_in_new_shard(self, col: _Collection) -> None:
        """Replaces ``shard/`` by the whole shard in ``.shard-new`` (write
        lock held); readers wait meanwhile."""
        current, old = col.path / SHARD_DIR, col.path / _OLD_SHARD
        with col.guard.replace():
            col.shard.close()
            current.rename(old)
            (col.path / _NEW_SHARD).rename(current)
            try:
                col.shard = qe.EdgeShard.load(str(current), self._config(col.spec))
            except Exception:
                current.rename(col.path / f".failed-{secrets.token_hex(4)}")
                old.rename(current)
                col.shard = qe.EdgeShard.load(str(current), self._config(col.spec))
                raise
            col.generation += 1
        _remove(old)

    def _close(self, col: _Collection) -> None:
        """Stops its index build, flushes and closes its shard."""
        with col.write_lock:
            col.stopping = True
            process, builder = col.build_process, col.builder
        if process is not None:
            process.kill()
        if builder is not None:
            builder.join()
        with col.write_lock, col.guard.replace():
            if not col.closed:
                col.closed = True
                col.shard.flush()
                col.shard.close()


def _quantization(kind: QuantizationKind) -> Any:
    if kind == "scalar_int8":
        return qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True)
    if kind == "binary":
        return qe.BinaryQuantizationConfig(always_ram=True)
    return None


def _edge_condition(condition: Condition) -> qe.FieldCondition:
    key = condition.key
    if condition.any_of is not None:
        return qe.FieldCondition(key=key, match=qe.MatchAny(list(condition.any_of)))  # type: ignore[arg-type]
    if condition.equals is not None:
        value = condition.equals
        # The binding reads a Python bool as an integer (bool is an int).
        match = qe.MatchValue(np.bool_(value) if isinstance(value, bool) else value)  # type: ignore[arg-type]
        return qe.FieldCondition(key=key, match=match)
    bounds = qe.RangeFloat(gt=condition.gt, gte=condition.gte, lt=condition.lt, lte=condition.lte)
    return qe.FieldCondition(key=key, range=bounds)


def _request(
    vector: np.ndarray,
    query: Query,
    edge_filter: qe.Filter | None,
    settings: tuple[Any, qe.SearchParams],
    options: SearchOptions,
) -> qe.QueryRequest:
    """The engine's request for one query; ``settings``: the payload
    selector and search parameters (``EdgeBackend._search_settings``)."""
    with_payload, params = settings
    return qe.QueryRequest(
        limit=query.k,
        query=qe.Query.Nearest(vector.tolist()),
        filter=edge_filter,
        score_threshold=query.score_threshold,
        with_payload=with_payload,
        with_vector=options.with_vector,
        params=params,
    )


def _edge_filter(filter: Filter | None, exclude: Iterable[str] = ()) -> qe.Filter | None:
    """The engine's filter; ``exclude``: engine ids to leave out."""
    must: list[Any] = [_edge_condition(c) for c in filter.must] if filter else []
    must_not: list[Any] = [_edge_condition(c) for c in filter.must_not] if filter else []
    excluded: set[int | uuid.UUID | str] = set(exclude)
    if excluded:
        must_not.append(qe.HasIdCondition(excluded))
    if not must and not must_not:
        return None
    return qe.Filter(must=must or None, must_not=must_not or None)


def _record(found: qe.Record, with_payload: bool) -> Record:
    payload = dict(found.payload or {})
    point_id = payload.pop(ID_KEY)
    return Record(
        id=point_id,
        payload=payload if with_payload else None,
        vector=None if found.vector is None else np.asarray(found.vector, np.float32),
    )


def _hit(point: qe.ScoredPoint, options: SearchOptions) -> Hit:
    payload = dict(point.payload or {})
    point_id = payload.pop(ID_KEY)
    return Hit(
        id=point_id,
        score=point.score,
        payload=payload if options.with_payload else None,
        vector=np.asarray(point.vector, np.float32) if options.with_vector else None,
    )


def _snapshot_info(path: Path) -> SnapshotInfo:
    with tarfile.open(path, "r:") as tar:
        member = tar.next()
        data = tar.extractfile(member) if member and member.name == SNAPSHOT_MANIFEST else None
        if data is None:
            raise ValueError(f"{path.name}: no {SNAPSHOT_MANIFEST}")
        manifest = json.loads(data.read())
    return SnapshotInfo(
        name=manifest["name"],
        collection=manifest["collection"],
        point_count=int(manifest["point_count"]),
        size_bytes=path.stat().st_size,
        create_time=datetime.fromisoformat(manifest["create_time"]),
    )


def _extract(path: Path, dest: Path) -> None:
    """Unpacks a snapshot tar into ``dest`` (made here): only its manifest,
    collection.json and shard/, with tarfile's "data" filter (no absolute
    paths, no '..', no links out, no devices). ValueError if it is not one."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            for member in members:
                top = member.name.split("/", 1)[0]
                if top not in (SNAPSHOT_MANIFEST, SPEC_FILE, SHARD_DIR):
                    raise ValueError(f"unexpected member {member.name[:100]!r} in {path.name}")
            names = {m.name for m in members}
            if SPEC_FILE not in names or SHARD_DIR not in names:
                raise ValueError(f"{path.name} is not a collection snapshot")
            dest.mkdir()
            tar.extractall(dest, members=members, filter="data")
    except tarfile.TarError as exc:
        raise ValueError(f"{path.name} is not a readable tar: {exc}") from exc


def _add_tree(tar: tarfile.TarFile, root: Path, arcname: str) -> None:
    """Adds a folder, its mostly-zero files as GNU sparse members."""
    tar.add(root, arcname=arcname, recursive=False)
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(folder)
        rel = base.relative_to(root)
        for name in dirs:
            tar.add(base / name, arcname=f"{arcname}/{(rel / name).as_posix()}", recursive=False)
        for name in sorted(files):
            _add_file(tar, base / name, f"{arcname}/{(rel / name).as_posix()}")


def _add_file(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    size = path.stat().st_size
    end = _data_end(path, size) if size >= _SPARSE_MIN else size
    if size - end < _SPARSE_MIN:
        tar.add(path, arcname=arcname)
        return
    # GNU sparse format 1.0: the map (regions of data, then the file's end as
    # an empty region) in a 512-byte block, then the data.
    sparse_map = f"2\n0\n{end}\n{size}\n0\n".encode()
    sparse_map += bytes(-len(sparse_map) % 512)
    # The member keeps its own name (not GNU tar's GNUSparseFile.0/ one):
    # tarfile applies a long name's "path" record after GNU.sparse.name.
    member = tar.gettarinfo(path, arcname=arcname)
    member.size = len(sparse_map) + end
    member.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": arcname,
        "GNU.sparse.realsize": str(size),
    }
    with path.open("rb") as file:
        tar.addfile(member, _Prefixed(sparse_map, file))


class _Prefixed:
    """Reads ``head``, then ``file`` (what tarfile.addfile copies)."""

    def __init__(self, head: bytes, file: IO[bytes]) -> None:
        self._head = head
        self._file = file

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            head, self._head = self._head, b""
            return head + self._file.read()
        head, self._head = self._head[:size], self._head[size:]
        return head + self._file.read(size - len(head))


def _data_end(path: Path, size: int) -> int:
    """Where the file's trailing zeros start."""
    with path.open("rb") as file:
        end = size
        while end > 0:
            start = max(0, end - _BLOCK)
            file.seek(start)
            block = file.read(end - start).rstrip(b"\0")
            if block:
                return start + len(block)
            end = start
    return 0


def _copy_sparse(src: str, dst: str) -> str:
    """Copies a file leaving its zero blocks as holes (the engine's
    preallocated files are mostly zeros)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(_BLOCK):
            if block == _ZEROS[: len(block)]:
                fout.seek(len(block), os.SEEK_CUR)
            else:
                fout.write(block)
        fout.truncate()
    return dst


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

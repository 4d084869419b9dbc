"""A Qdrant server or cluster through ``qdrant-client`` (sync ``QdrantClient``).

What the tests exercise. They run this backend in qdrant-client's *local
mode* (``path=":memory:"`` or a folder), a pure-Python reimplementation of
Qdrant's API in the client. It exercises this module's own logic: the
mapping of specs, ids, payloads, filters, searches, batches,
recommendations (the average-vector strategy) and scrolls onto the client's
models, the catalog of collection metadata, the all-or-none upsert and its
undo, and the mapping of missing collections and points to errors. It does
NOT exercise Qdrant's engine: no HNSW (every search is exact brute force;
hnsw_ef and exact are not sent), no quantization (accepted, ignored), no
payload indexes (filters scan every point; indexes are not created), no
snapshots (local mode lists none and raises NotImplementedError for the
rest; this backend raises ``Unsupported`` for all four), no WAL and no
durability (a folder keeps pickled points in SQLite), no cluster
consistency (shards, replicas, write ordering), no network, no
authentication, no timeouts. Only an unreachable server is tested
(EngineUnavailable); everything else this module does against a server is
written to Qdrant's documented API, untested here.

Collection metadata the server does not keep (description, create time,
payload index types, quantization choice) lives in the reserved catalog
collection ``_mlmesh_catalog``: one point per collection (dimension 1), its
payload the spec's JSON. Creating, getting and listing go by the catalog
(point operations go straight to the Qdrant collection); the catalog point
is written after the Qdrant collection is created (the create is undone if
that fails) and deleted before it, so a crash between the two leaves a
Qdrant collection without a catalog point, which create refuses
(CollectionExists) and delete_collection removes.

Upserts are all-or-none as in the edge backend: the previous records of the
batch's ids are read first; if a write fails, they are written back and the
new ids deleted, and ``EngineUnavailable`` is raised. Against an unreachable
server the undo may fail too (it is logged); retrying the same batch is safe.
Writes to a collection are serialized in this process only: two instances
writing the same ids at once can undo each other's write on a failure.

Snapshots (server): Qdrant's collection snapshots, taken on the node the
client talks to (for a cluster, one node's shards: use Qdrant's own
tooling). A restore asks the server to recover from its own file,
``file://<snapshots_path>/<collection>/<name>`` (``snapshots_path``: the
server's ``storage.snapshots_path``, /qdrant/snapshots in its image).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.common.client_exceptions import QdrantException
from qdrant_client.http.exceptions import ApiException, UnexpectedResponse

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
    Unsupported,
    engine_id,
    spec_from_json,
    spec_to_json,
)

log = logging.getLogger(__name__)

CATALOG = "_mlmesh_catalog"
# Catalog payload key: point counts of the collection's snapshots, by name
# (the server's snapshot list does not say).
_SNAPSHOT_POINTS = "snapshot_points"

_DISTANCES = {
    Distance.COSINE: qm.Distance.COSINE,
    Distance.DOT: qm.Distance.DOT,
    Distance.EUCLID: qm.Distance.EUCLID,
    Distance.MANHATTAN: qm.Distance.MANHATTAN,
}
_SCHEMAS: dict[PayloadType, qm.PayloadSchemaType] = {
    "keyword": qm.PayloadSchemaType.KEYWORD,
    "integer": qm.PayloadSchemaType.INTEGER,
    "float": qm.PayloadSchemaType.FLOAT,
    "bool": qm.PayloadSchemaType.BOOL,
}
_ID_ONLY = qm.PayloadSelectorInclude(include=[ID_KEY])
_STRONG = qm.WriteOrdering.STRONG


class RemoteBackend:
    """``VectorBackend`` on a Qdrant server (``url``) or qdrant-client's
    local mode (``path``: ":memory:" or a folder; see the module docstring).

    Test hooks, as in the edge backend: ``max_points_per_update`` points per
    request, and ``fault_hook`` called between two requests of one upsert.
    """

    def __init__(
        self,
        url: str = "",
        *,
        path: str | None = None,
        api_key: str | None = None,
        default_ef: int = 64,
        timeout_s: float = 10.0,
        snapshots_path: str = "/qdrant/snapshots",
    ) -> None:
        if not url and path is None:
            raise ValueError("RemoteBackend needs a url or a path")
        self._local = path is not None
        if path == ":memory:":
            self._client = QdrantClient(location=":memory:")
        elif path is not None:
            # The servicer calls from worker threads; calls are serialized below.
            self._client = QdrantClient(path=path, force_disable_check_same_thread=True)
        else:
            self._client = QdrantClient(
                url=url,
                api_key=api_key,
                timeout=math.ceil(timeout_s),
                # No request at construction: the service starts with the
                # cluster down and answers UNAVAILABLE until it is up.
                check_compatibility=False,
            )
        self._default_ef = default_ef
        self._snapshots_path = snapshots_path.rstrip("/")
        self.max_points_per_update = 1000
        self.fault_hook: Callable[[], None] | None = None
        # Local mode is plain Python objects: one call at a time.
        self._local_lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if self._local else contextlib.nullcontext()
        )
        self._locks_guard = threading.Lock()
        self._write_locks: dict[str, threading.Lock] = {}
        self._catalog_ready = False

    # --- collections ---

    def create_collection(self, spec: CollectionSpec) -> CollectionSpec:
        if spec.name == CATALOG:
            raise CollectionExists(spec.name)
        spec = replace(spec, create_time=datetime.now(UTC))
        with self._write_lock(spec.name), self._engine():
            self._ensure_catalog()
            if self._catalog_entry(spec.name) is not None:
                raise CollectionExists(spec.name)
            if self._client.collection_exists(spec.name):
                # Made outside this backend, or left by a create that died
                # before its catalog write: delete_collection removes it.
                raise CollectionExists(spec.name)
            self._client.create_collection(
                spec.name,
                vectors_config=qm.VectorParams(
                    size=spec.dimension, distance=_DISTANCES[spec.distance]
                ),
                hnsw_config=qm.HnswConfigDiff(
                    m=spec.hnsw_m,
                    ef_construct=spec.hnsw_ef_construct,
                    full_scan_threshold=FULL_SCAN_THRESHOLD_KB,
                ),
                quantization_config=_quantization(spec.quantization),
            )
            try:
                if not self._local:  # local mode has no payload indexes (and warns)
                    for key, kind in spec.payload_indexes:
                        self._client.create_payload_index(
                            spec.name, key, _SCHEMAS[kind], wait=True, ordering=_STRONG
                        )
                self._client.upsert(
                    CATALOG,
                    [qm.PointStruct(id=engine_id(spec.name), vector=[1.0], payload=_entry(spec))],
                    wait=True,
                    ordering=_STRONG,
                )
            except BaseException:
                self._client.delete_collection(spec.name)
                raise
        return spec

    def spec(self, name: str) -> CollectionSpec:
        """From the catalog (one point read)."""
        with self._engine(name):
            return self._spec(name)

    def get_collection(self, name: str) -> CollectionState:
        with self._engine(name):
            spec = self._spec(name)
            points = self._client.count(name, exact=True).count
            info = self._client.get_collection(name)
        indexed = info.indexed_vectors_count or 0
        # Qdrant says yellow while its optimizers (indexing) run.
        return CollectionState(
            spec, points, min(indexed, points), info.status == qm.CollectionStatus.YELLOW
        )

    def list_collections(self) -> list[CollectionSpec]:
        with self._engine():
            self._ensure_catalog()
            specs, offset = [], None
            while True:
                found, offset = self._client.scroll(
                    CATALOG, limit=256, offset=offset, with_payload=True
                )
                specs += [spec_from_json((r.payload or {})["spec"]) for r in found]
                if offset is None:
                    break
        return sorted(specs, key=lambda s: s.name)

    def delete_collection(self, name: str) -> bool:
        if name == CATALOG:
            return False
        with self._write_lock(name), self._engine():
            self._ensure_catalog()
            listed = self._catalog_entry(name) is not None
            if listed:
                self._client.delete(CATALOG, [engine_id(name)], wait=True, ordering=_STRONG)
            existed = self._client.delete_collection(name)
        return listed or bool(existed)

    # --- points ---

    def upsert(self, collection: str, batch: Batch) -> int:
        ids: list[qm.ExtendedPointId] = [engine_id(point_id) for point_id in batch.ids]
        payloads = batch.payloads or [{} for _ in batch.ids]
        full = [{**p, ID_KEY: point_id} for p, point_id in zip(payloads, batch.ids, strict=True)]
        vectors = batch.vectors.tolist()
        step = self.max_points_per_update
        with self._write_lock(collection), self._engine(collection):
            previous = self._client.retrieve(collection, ids, with_payload=True, with_vectors=True)
            try:
                for start in range(0, len(ids), step):
                    if start and self.fault_hook is not None:
                        self.fault_hook()
                    end = start + step
                    chunk = qm.Batch(
                        ids=ids[start:end], vectors=vectors[start:end], payloads=full[start:end]
                    )
                    self._client.upsert(collection, chunk, wait=True, ordering=_STRONG)
            except Exception as exc:
                self._undo(collection, ids, previous)
                raise EngineUnavailable(f"upsert to {collection} failed; undone") from exc
        return len(ids)

    def retrieve(
        self, collection: str, ids: Sequence[str], with_payload: bool, with_vector: bool
    ) -> list[Record]:
        wanted: list[qm.ExtendedPointId] = [engine_id(point_id) for point_id in ids]
        with self._engine(collection):
            found = self._client.retrieve(
                collection,
                wanted,
                with_payload=True if with_payload else _ID_ONLY,
                with_vectors=with_vector,
            )
        records = {r.id: r for r in (_record(f, with_payload) for f in found)}
        return [records[point_id] for point_id in ids if point_id in records]

    def delete_ids(self, collection: str, ids: Sequence[str]) -> int:
        wanted: list[qm.ExtendedPointId] = [engine_id(point_id) for point_id in set(ids)]
        with self._write_lock(collection), self._engine(collection):
            found = self._client.retrieve(collection, wanted, with_payload=False)
            if found:
                existing = qm.PointIdsList(points=[r.id for r in found])
                self._client.delete(collection, existing, wait=True, ordering=_STRONG)
        return len(found)

    def delete_by_filter(self, collection: str, filter: Filter) -> int:
        client_filter = _client_filter(filter) or qm.Filter()
        with self._write_lock(collection), self._engine(collection):
            matching = self._client.count(collection, client_filter, exact=True).count
            if matching:
                self._client.delete(
                    collection, qm.FilterSelector(filter=client_filter), wait=True, ordering=_STRONG
                )
        return matching

    def count(self, collection: str, filter: Filter | None = None) -> int:
        with self._engine(collection):
            return self._client.count(collection, _client_filter(filter), exact=True).count

    def search(
        self, collection: str, queries: Sequence[Query], options: SearchOptions
    ) -> list[list[Hit]]:
        requests = [
            qm.QueryRequest(
                query=q.vector.tolist(),
                filter=_client_filter(q.filter),
                limit=q.k,
                score_threshold=q.score_threshold,
                params=self._params(options),
                with_payload=True if options.with_payload else _ID_ONLY,
                with_vector=options.with_vector,
            )
            for q in queries
        ]
        with self._engine(collection):
            results = self._client.query_batch_points(collection, requests)
        return [[_hit(p, options) for p in result.points] for result in results]

    def recommend(
        self,
        collection: str,
        positive: Sequence[str],
        negative: Sequence[str],
        query: Query,
        options: SearchOptions,
    ) -> list[Hit]:
        examples = {point_id: engine_id(point_id) for point_id in [*positive, *negative]}
        with self._engine(collection):
            wanted: list[qm.ExtendedPointId] = list(examples.values())
            found = {
                str(r.id) for r in self._client.retrieve(collection, wanted, with_payload=False)
            }
            missing = next((p for p, eid in examples.items() if eid not in found), None)
            if missing is not None:
                raise PointNotFound(missing)
            # The server leaves the examples out.
            response = self._client.query_points(
                collection,
                query=qm.RecommendQuery(
                    recommend=qm.RecommendInput(
                        positive=[examples[p] for p in positive],
                        negative=[examples[n] for n in negative],
                        strategy=qm.RecommendStrategy.AVERAGE_VECTOR,
                    )
                ),
                query_filter=_client_filter(query.filter),
                limit=query.k,
                score_threshold=query.score_threshold,
                search_params=self._params(options),
                with_payload=True if options.with_payload else _ID_ONLY,
                with_vectors=options.with_vector,
            )
        return [_hit(p, options) for p in response.points]

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
        start = None if offset is None else str(uuid.UUID(offset))
        with self._engine(collection):
            found, next_offset = self._client.scroll(
                collection,
                scroll_filter=_client_filter(filter),
                limit=limit,
                offset=start,
                with_payload=True if with_payload else _ID_ONLY,
                with_vectors=with_vector,
            )
        records = [_record(r, with_payload) for r in found]
        return records, None if next_offset is None else str(next_offset)

    # --- snapshots (server only) ---

    def create_snapshot(self, collection: str) -> SnapshotInfo:
        self._no_local_snapshots()
        with self._write_lock(collection), self._engine(collection):
            entry = self._catalog_entry(collection)
            if entry is None:
                raise CollectionNotFound(collection)
            points = self._client.count(collection, exact=True).count
            made = self._client.create_snapshot(collection, wait=True)
            if made is None:
                raise EngineUnavailable(f"snapshot of {collection} returned nothing")
            counts = {**entry.get(_SNAPSHOT_POINTS, {}), made.name: points}
            self._client.set_payload(
                CATALOG, {_SNAPSHOT_POINTS: counts}, [engine_id(collection)], wait=True
            )
        return _snapshot(collection, made, counts)

    def list_snapshots(self, collection: str) -> list[SnapshotInfo]:
        self._no_local_snapshots()
        with self._engine(collection):
            entry = self._catalog_entry(collection)
            if entry is None:
                raise CollectionNotFound(collection)
            made = self._client.list_snapshots(collection)
        counts = entry.get(_SNAPSHOT_POINTS, {})
        found = [_snapshot(collection, s, counts) for s in made]
        return sorted(found, key=lambda s: (s.create_time, s.name), reverse=True)

    def restore_snapshot(self, collection: str, snapshot: str) -> CollectionState:
        self._find_snapshot(collection, snapshot)
        with self._write_lock(collection), self._engine(collection):
            self._client.recover_snapshot(
                collection,
                f"file://{self._snapshots_path}/{collection}/{snapshot}",
                wait=True,
            )
        return self.get_collection(collection)

    def delete_snapshot(self, collection: str, snapshot: str) -> None:
        self._find_snapshot(collection, snapshot)
        with self._engine(collection):
            self._client.delete_snapshot(collection, snapshot, wait=True)

    def close(self) -> None:
        with self._local_lock:
            self._client.close()

    # --- internals ---

    @contextlib.contextmanager
    def _engine(self, collection: str | None = None) -> Iterator[None]:
        """Maps the client's errors: a missing collection to
        CollectionNotFound, the rest (unreachable, timed out, refused) to
        EngineUnavailable."""
        with self._local_lock:
            try:
                yield
            except UnexpectedResponse as exc:
                if exc.status_code == 404 and collection is not None:
                    raise CollectionNotFound(collection) from exc
                raise EngineUnavailable(f"qdrant: {str(exc)[:300]}") from exc
            except (ApiException, QdrantException) as exc:
                raise EngineUnavailable(f"qdrant: {str(exc)[:300]}") from exc
            except ValueError as exc:
                # Local mode raises ValueError for a missing collection.
                if (
                    self._local
                    and collection is not None
                    and not self._client.collection_exists(collection)
                ):
                    raise CollectionNotFound(collection) from exc
                raise

    def _write_lock(self, collection: str) -> threading.Lock:
        with self._locks_guard:
            return self._write_locks.setdefault(collection, threading.Lock())

    def _ensure_catalog(self) -> None:
        if self._catalog_ready:
            return
        if not self._client.collection_exists(CATALOG):
            try:
                self._client.create_collection(
                    CATALOG, vectors_config=qm.VectorParams(size=1, distance=qm.Distance.DOT)
                )
            except (UnexpectedResponse, ValueError):
                # Made by another instance meanwhile.
                if not self._client.collection_exists(CATALOG):
                    raise
        self._catalog_ready = True

    def _catalog_entry(self, name: str) -> dict[str, Any] | None:
        self._ensure_catalog()
        found = self._client.retrieve(CATALOG, [engine_id(name)], with_payload=True)
        return found[0].payload if found else None

    def _spec(self, name: str) -> CollectionSpec:
        entry = self._catalog_entry(name)
        if entry is None:
            raise CollectionNotFound(name)
        return spec_from_json(entry["spec"])

    def _params(self, options: SearchOptions) -> qm.SearchParams | None:
        if self._local:  # exact search only (and it warns about params)
            return None
        return qm.SearchParams(
            hnsw_ef=options.hnsw_ef or self._default_ef,
            exact=options.exact,
            quantization=qm.QuantizationSearchParams(rescore=True),
        )

    def _undo(
        self, collection: str, ids: list[qm.ExtendedPointId], previous: list[qm.Record]
    ) -> None:
        existed = {str(r.id) for r in previous}
        added: list[qm.ExtendedPointId] = [
            eid for eid in dict.fromkeys(ids) if str(eid) not in existed
        ]
        try:
            if previous:
                points = [
                    qm.PointStruct(id=r.id, vector=cast(list[float], r.vector), payload=r.payload)
                    for r in previous
                ]
                self._client.upsert(collection, points, wait=True, ordering=_STRONG)
            if added:
                selector = qm.PointIdsList(points=added)
                self._client.delete(collection, selector, wait=True, ordering=_STRONG)
        except Exception:
            log.exception("could not undo a failed upsert to %s", collection)

    def _no_local_snapshots(self) -> None:
        if self._local:
            raise Unsupported("qdrant-client's local mode has no snapshots")

    def _find_snapshot(self, collection: str, snapshot: str) -> None:
        if not any(s.name == snapshot for s in self.list_snapshots(collection)):
            raise SnapshotNotFound(collection, snapshot)


def _entry(spec: CollectionSpec) -> dict[str, Any]:
    return {"spec": spec_to_json(spec), _SNAPSHOT_POINTS: {}}


def _quantization(kind: QuantizationKind) -> Any:
    if kind == "scalar_int8":
        return qm.ScalarQuantization(
            scalar=qm.ScalarQuantizationConfig(
                type=qm.ScalarType.INT8, quantile=0.99, always_ram=True
            )
        )
    if kind == "binary":
        return qm.BinaryQuantization(binary=qm.BinaryQuantizationConfig(always_ram=True))
    return None


def _condition(condition: Condition) -> qm.FieldCondition:
    key = condition.key
    if condition.any_of is not None:
        return qm.FieldCondition(key=key, match=qm.MatchAny(any=list(condition.any_of)))  # type: ignore[arg-type]
    if condition.equals is not None:
        return qm.FieldCondition(key=key, match=qm.MatchValue(value=condition.equals))
    bounds = qm.Range(gt=condition.gt, gte=condition.gte, lt=condition.lt, lte=condition.lte)
    return qm.FieldCondition(key=key, range=bounds)


def _client_filter(filter: Filter | None) -> qm.Filter | None:
    if not filter:
        return None
    must: list[Any] = [_condition(c) for c in filter.must]
    must_not: list[Any] = [_condition(c) for c in filter.must_not]
    return qm.Filter(must=must or None, must_not=must_not or None)


def _record(found: qm.Record, with_payload: bool) -> Record:
    payload = dict(found.payload or {})
    point_id = payload.pop(ID_KEY)
    vector = found.vector
    return Record(
        id=point_id,
        payload=payload if with_payload else None,
        vector=None if vector is None else np.asarray(vector, np.float32),
    )


def _hit(point: qm.ScoredPoint, options: SearchOptions) -> Hit:
    payload = dict(point.payload or {})
    point_id = payload.pop(ID_KEY)
    return Hit(
        id=point_id,
        score=point.score,
        payload=payload if options.with_payload else None,
        vector=np.asarray(point.vector, np.float32) if options.with_vector else None,
    )


def _snapshot(
    collection: str, made: qm.SnapshotDescription, counts: dict[str, int]
) -> SnapshotInfo:
    created = datetime.fromisoformat(made.creation_time) if made.creation_time else None
    if created is None:
        created = datetime.fromtimestamp(0, UTC)
    elif created.tzinfo is None:  # the server writes UTC without an offset
        created = created.replace(tzinfo=UTC)
    return SnapshotInfo(
        name=made.name,
        collection=collection,
        point_count=int(counts.get(made.name, 0)),
        size_bytes=made.size,
        create_time=created,
    )

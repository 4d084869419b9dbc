"""The storage interface of the vector service, and the values it speaks.

Two engines implement ``VectorBackend``:

- ``edge.EdgeBackend``: Qdrant's engine in process (``qdrant-edge-py``), one
  shard per collection on local disk. The embedded default.
- ``remote.RemoteBackend``: a Qdrant server or cluster through
  ``qdrant-client`` (in tests: qdrant-client's local mode).

The servicer validates every request before it reaches a backend (names,
dimensions, finite values, indexed filter keys, sizes), so a backend may
assume well-formed input. Backends are synchronous and thread-safe: the
servicer calls them from worker threads, never on the event loop.

Point ids are the caller's strings. A backend maps each to a UUIDv5
(``engine_id``) and keeps the caller's string in the reserved payload key
``ID_KEY``, which it strips from every payload it returns.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

import numpy as np

# The payload key holding the caller's id (callers may not use keys that
# start with '_').
ID_KEY = "_id"
# Qdrant's full_scan_threshold (KB of vectors): a filtered search whose
# filter the payload index estimates below this many KB of matching vectors
# is answered exactly from the index's matches instead of walking the HNSW
# graph with the filter. Qdrant's default (10,000 KB: ~6.7k points of 384-d)
# let a filter keeping 10% of 100k points walk the graph, at recall@10 0.944
# (ef 64; 0.978 at ef 256); 20,000 KB (~13k points of 384-d) answers it
# exactly (1.000), at about a fifth of the graph walk's rate (both measured
# on the engine alone, bench/README.md). Unfiltered searches do not change.
FULL_SCAN_THRESHOLD_KB = 20_000
# Namespace of the UUIDv5 engine ids.
ID_NAMESPACE = uuid.UUID("6f1d3c0e-6a53-5b0e-9d0c-3f7a1b2c4d5e")


def engine_id(point_id: str) -> str:
    """The engine's id for a caller's point id (stable, collision-free in
    practice: UUIDv5 of the id)."""
    return str(uuid.uuid5(ID_NAMESPACE, point_id))


class Distance(enum.Enum):
    COSINE = "cosine"
    DOT = "dot"
    EUCLID = "euclid"
    MANHATTAN = "manhattan"

    @property
    def higher_is_closer(self) -> bool:
        return self in (Distance.COSINE, Distance.DOT)


PayloadType = Literal["keyword", "integer", "float", "bool"]
QuantizationKind = Literal["none", "scalar_int8", "binary"]


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection is made with; immutable after create."""

    name: str
    dimension: int
    distance: Distance
    description: str = ""
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    quantization: QuantizationKind = "none"
    # (key, type) of each filterable payload field.
    payload_indexes: tuple[tuple[str, PayloadType], ...] = ()
    # Set by the backend on create (UTC).
    create_time: datetime | None = None

    def index_type(self, key: str) -> PayloadType | None:
        return next((t for k, t in self.payload_indexes if k == key), None)


def spec_to_json(spec: CollectionSpec) -> dict[str, Any]:
    """The spec as JSON values: what a backend stores next to a collection
    (the edge's collection.json, the remote catalog's payload)."""
    return {
        "name": spec.name,
        "dimension": spec.dimension,
        "distance": spec.distance.value,
        "description": spec.description,
        "hnsw_m": spec.hnsw_m,
        "hnsw_ef_construct": spec.hnsw_ef_construct,
        "quantization": spec.quantization,
        "payload_indexes": [[key, kind] for key, kind in spec.payload_indexes],
        "create_time": spec.create_time.isoformat() if spec.create_time else None,
    }


def spec_from_json(data: dict[str, Any]) -> CollectionSpec:
    """The inverse of ``spec_to_json``."""
    create_time = data.get("create_time")
    return CollectionSpec(
        name=data["name"],
        dimension=int(data["dimension"]),
        distance=Distance(data["distance"]),
        description=data.get("description", ""),
        hnsw_m=int(data.get("hnsw_m", 16)),
        hnsw_ef_construct=int(data.get("hnsw_ef_construct", 100)),
        quantization=data.get("quantization", "none"),
        payload_indexes=tuple((key, kind) for key, kind in data.get("payload_indexes", ())),
        create_time=datetime.fromisoformat(create_time) if create_time else None,
    )


@dataclass(frozen=True)
class CollectionState:
    spec: CollectionSpec
    point_count: int
    indexed_point_count: int
    # An index build is running.
    indexing: bool = False


@dataclass(frozen=True)
class Condition:
    """One test of an indexed payload field: exactly one of ``equals``,
    ``any_of`` or a range bound is set."""

    key: str
    equals: str | int | bool | None = None
    any_of: tuple[str | int, ...] | None = None
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class Filter:
    must: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.must or self.must_not)


@dataclass
class Record:
    """A stored point: the caller's id, and its payload and vector when
    asked for (payload without ID_KEY)."""

    id: str
    payload: dict[str, Any] | None = None
    vector: np.ndarray | None = None


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any] | None = None
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class Query:
    """One nearest-neighbour query."""

    vector: np.ndarray  # float32, the collection's dimension
    k: int = 10
    filter: Filter | None = None
    score_threshold: float | None = None


@dataclass(frozen=True)
class SearchOptions:
    with_payload: bool = False
    with_vector: bool = False
    hnsw_ef: int | None = None  # None: the backend's default (64)
    exact: bool = False


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    collection: str
    point_count: int
    size_bytes: int
    create_time: datetime


@dataclass
class Batch:
    """Points to upsert: ``ids[i]`` has ``vectors[i]`` (float32, shape
    [n, dimension]) and ``payloads[i]`` (without ID_KEY)."""

    ids: list[str]
    vectors: np.ndarray
    payloads: list[dict[str, Any]] = field(default_factory=list)


# --- errors a backend raises (the servicer maps them to gRPC statuses) ---


class BackendError(Exception):
    """Base of the errors below."""


class CollectionNotFound(BackendError):
    def __init__(self, name: str) -> None:
        super().__init__(f"collection {name} not found")
        self.name = name


class CollectionExists(BackendError):
    def __init__(self, name: str) -> None:
        super().__init__(f"collection {name} already exists")
        self.name = name


class SnapshotNotFound(BackendError):
    def __init__(self, collection: str, name: str) -> None:
        super().__init__(f"snapshot {name} of collection {collection} not found")
        self.collection = collection
        self.name = name


class PointNotFound(BackendError):
    """An example id (recommend) is not in the collection."""

    def __init__(self, point_id: str) -> None:
        super().__init__(f"point {point_id[:40]} not found")
        self.point_id = point_id


class Unsupported(BackendError):
    """The engine behind this backend cannot do it (e.g. snapshots in
    qdrant-client's local mode)."""


class EngineUnavailable(BackendError):
    """The engine could not be reached or failed; nothing was written."""


class VectorBackend(Protocol):
    """One engine's collections. Every write is all-or-nothing: it raises
    having changed nothing, or returns having applied every point. A
    returned write is durable against a killed process (SIGKILL)."""

    def create_collection(self, spec: CollectionSpec) -> CollectionSpec:
        """Creates it; returns the spec with create_time. CollectionExists."""
        ...

    def get_collection(self, name: str) -> CollectionState:
        """CollectionNotFound."""
        ...

    def spec(self, name: str) -> CollectionSpec:
        """The collection's spec alone (what every request checks against):
        no counts, as cheap as the engine allows. CollectionNotFound."""
        ...

    def list_collections(self) -> list[CollectionSpec]:
        """Every collection, by name."""
        ...

    def delete_collection(self, name: str) -> bool:
        """Deletes it with its snapshots; False if it did not exist."""
        ...

    def upsert(self, collection: str, batch: Batch) -> int:
        """Writes every point or none (an existing id is replaced); returns
        the count written."""
        ...

    def retrieve(
        self, collection: str, ids: Sequence[str], with_payload: bool, with_vector: bool
    ) -> list[Record]:
        """The points found, in the order of ``ids`` (unknown ids left out)."""
        ...

    def delete_ids(self, collection: str, ids: Sequence[str]) -> int:
        """Deletes those that exist; returns how many did."""
        ...

    def delete_by_filter(self, collection: str, filter: Filter) -> int:
        """Deletes every point matching; returns how many."""
        ...

    def count(self, collection: str, filter: Filter | None = None) -> int:
        """Exact count."""
        ...

    def search(
        self, collection: str, queries: Sequence[Query], options: SearchOptions
    ) -> list[list[Hit]]:
        """One list of hits per query, closest first."""
        ...

    def recommend(
        self,
        collection: str,
        positive: Sequence[str],
        negative: Sequence[str],
        query: Query,
        options: SearchOptions,
    ) -> list[Hit]:
        """Nearest the positive examples and far from the negative ones
        (Qdrant's average-vector strategy); never the examples themselves.
        ``query.vector`` is ignored. PointNotFound for an unknown example."""
        ...

    def scroll(
        self,
        collection: str,
        offset: str | None,
        limit: int,
        filter: Filter | None,
        with_payload: bool,
        with_vector: bool,
    ) -> tuple[list[Record], str | None]:
        """Points in engine-id order from ``offset`` (an opaque string this
        method returned, or None for the start); the next offset, or None at
        the end."""
        ...

    def create_snapshot(self, collection: str) -> SnapshotInfo:
        """A consistent copy of the collection (writes wait while it is taken)."""
        ...

    def list_snapshots(self, collection: str) -> list[SnapshotInfo]:
        """Newest first."""
        ...

    def restore_snapshot(self, collection: str, snapshot: str) -> CollectionState:
        """Replaces the collection's points with the snapshot's.
        SnapshotNotFound."""
        ...

    def delete_snapshot(self, collection: str, snapshot: str) -> None:
        """SnapshotNotFound."""
        ...

    def close(self) -> None:
        """Flushes and releases the engine."""
        ...

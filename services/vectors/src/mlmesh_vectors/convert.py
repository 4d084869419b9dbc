"""Requests to engine values, and engine values to responses, with every
check protovalidate cannot make (it has checked the patterns, lengths and
ranges in the contract before a servicer method runs): dimensions, finite
values, unique ids, reserved and oversized payloads, filters on indexed
fields with values of the field's type.

Every check raises one INVALID_ARGUMENT listing each bad field (BadRequest),
before anything is written.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC
from typing import Any

import numpy as np
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    struct_pb2,
    timestamp_pb2,
)
from google.protobuf.message import Message
from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh_chassis.errors import FieldViolation, InvalidArgument

from mlmesh_vectors.engine.base import (
    Batch,
    CollectionSpec,
    CollectionState,
    Condition,
    Distance,
    Filter,
    Hit,
    PayloadType,
    QuantizationKind,
    Record,
    SnapshotInfo,
)

# A point's payload, serialized, at most.
MAX_PAYLOAD_BYTES = 64 * 1024
# Violations named in an error's message (all are in its BadRequest).
SHOWN = 3

DISTANCES = {
    pb.DISTANCE_COSINE: Distance.COSINE,
    pb.DISTANCE_DOT: Distance.DOT,
    pb.DISTANCE_EUCLID: Distance.EUCLID,
    pb.DISTANCE_MANHATTAN: Distance.MANHATTAN,
}
_DISTANCES_PB = {v: k for k, v in DISTANCES.items()}
PAYLOAD_TYPES: dict[int, PayloadType] = {
    pb.PAYLOAD_TYPE_KEYWORD: "keyword",
    pb.PAYLOAD_TYPE_INTEGER: "integer",
    pb.PAYLOAD_TYPE_FLOAT: "float",
    pb.PAYLOAD_TYPE_BOOL: "bool",
}
_PAYLOAD_TYPES_PB: dict[str, Any] = {v: k for k, v in PAYLOAD_TYPES.items()}
QUANTIZATION: dict[int, QuantizationKind] = {
    pb.QUANTIZATION_KIND_UNSPECIFIED: "none",
    pb.QUANTIZATION_KIND_SCALAR_INT8: "scalar_int8",
    pb.QUANTIZATION_KIND_BINARY: "binary",
}
_QUANTIZATION_PB: dict[str, Any] = {v: k for k, v in QUANTIZATION.items()}


def fail(violations: list[FieldViolation], **metadata: str) -> None:
    if violations:
        raise InvalidArgument.listing(violations, SHOWN, **metadata)


# ---- collections ------------------------------------------------------------


def spec_of(message: pb.Collection) -> CollectionSpec:
    keys = [index.key for index in message.payload_indexes]
    violations = [
        FieldViolation(f"collection.payload_indexes[{i}].key", "is declared twice")
        for i, key in enumerate(keys)
        if key in keys[:i]
    ]
    if message.hnsw.m and message.hnsw.m < 4:
        violations.append(FieldViolation("collection.hnsw.m", "must be 0 (default) or 4 to 128"))
    if message.hnsw.ef_construct and message.hnsw.ef_construct < 4:
        violations.append(
            FieldViolation("collection.hnsw.ef_construct", "must be 0 (default) or 4 to 1000")
        )
    fail(violations)
    return CollectionSpec(
        name=message.name,
        dimension=message.dimension,
        distance=DISTANCES[message.distance],
        description=message.description,
        hnsw_m=message.hnsw.m or 16,
        hnsw_ef_construct=message.hnsw.ef_construct or 100,
        quantization=QUANTIZATION[message.quantization.kind],
        payload_indexes=tuple(
            (index.key, PAYLOAD_TYPES[index.type]) for index in message.payload_indexes
        ),
    )


def collection_message(state: CollectionState | CollectionSpec) -> pb.Collection:
    spec = state.spec if isinstance(state, CollectionState) else state
    message = pb.Collection(
        name=spec.name,
        dimension=spec.dimension,
        distance=_DISTANCES_PB[spec.distance],
        description=spec.description,
        hnsw=pb.HnswConfig(m=spec.hnsw_m, ef_construct=spec.hnsw_ef_construct),
        quantization=pb.Quantization(kind=_QUANTIZATION_PB[spec.quantization]),
        payload_indexes=[
            pb.PayloadIndex(key=key, type=_PAYLOAD_TYPES_PB[kind])
            for key, kind in spec.payload_indexes
        ],
    )
    if isinstance(state, CollectionState):
        message.point_count = state.point_count
        message.indexed_point_count = state.indexed_point_count
        message.indexing = state.indexing
    if spec.create_time is not None:
        message.create_time.CopyFrom(timestamp(spec.create_time))
    return message


def timestamp(when: Any) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC))
    return stamp


def snapshot_message(info: SnapshotInfo) -> pb.Snapshot:
    return pb.Snapshot(
        name=info.name,
        collection=info.collection,
        point_count=info.point_count,
        size_bytes=info.size_bytes,
        create_time=timestamp(info.create_time),
    )


# ---- vectors and payloads --------------------------------------------------------


def vector_of(message: Message, spec: CollectionSpec, field: str) -> np.ndarray:
    """The message's ``vector`` (a ``repeated float``), or INVALID_ARGUMENT
    (wrong length, NaN or inf, all zeros for cosine)."""
    vector = packed_floats(message)
    fail(_vector_violations(vector, spec, field))
    return vector


def vectors_of(
    messages: Sequence[Message], spec: CollectionSpec, field: Callable[[int], str]
) -> tuple[np.ndarray, dict[int, FieldViolation]]:
    """The ``vector`` of each message as one float32 matrix [n, dimension],
    and the violation (``vector_of``'s) of each bad one by index (its row is
    zeros); ``field(i)`` names message i's vector."""
    matrix = np.zeros((len(messages), spec.dimension), dtype=np.float32)
    violations: dict[int, FieldViolation] = {}
    for i, message in enumerate(messages):
        vector = packed_floats(message)
        if vector.shape[0] == spec.dimension:
            matrix[i] = vector
        else:
            violations[i] = _vector_violations(vector, spec, field(i))[0]
    # The finite and non-zero checks, for every row at once.
    finite = np.asarray(np.isfinite(matrix).all(axis=1))
    cosine = spec.distance is Distance.COSINE
    nonzero = np.asarray(matrix.any(axis=1)) if cosine else finite
    if violations or not finite.all() or not nonzero.all():
        for i in range(len(messages)):
            if i in violations:
                continue
            if not finite[i]:
                violations[i] = FieldViolation(field(i), "holds NaN or infinite values")
            elif cosine and not nonzero[i]:
                violations[i] = FieldViolation(
                    field(i), "is all zeros (no direction to compare by cosine)"
                )
    return matrix, violations


def packed_floats(message: Message, name: str = "vector") -> np.ndarray:
    """The values of the message's ``repeated float`` field ``name``, as a
    float32 array (read-only), without a Python float per value.

    The protobuf runtime (upb) has no buffer view of a repeated field, and
    numpy reading one value at a time costs ~16 us per 384 values; instead
    the message is serialized (its fields are packed: proto3) and read back
    as a message with ``repeated bytes`` at that field's number, whose
    values are the packed floats' bytes (little-endian)."""
    field = message.DESCRIPTOR.fields_by_name[name]
    if field.type != field.TYPE_FLOAT or not field.is_packed:  # not what this reads
        return np.asarray(getattr(message, name), dtype=np.float32)
    chunks = _packed_reader(field.number).FromString(message.SerializeToString()).values
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) % 4:  # not packed floats after all (the parser should refuse those)
        return np.asarray(getattr(message, name), dtype=np.float32)
    return np.frombuffer(data, dtype="<f4")


@functools.cache
def _packed_reader(number: int) -> Any:
    """A message type of one field: ``repeated bytes values = number``
    (in a descriptor pool of its own)."""
    file = descriptor_pb2.FileDescriptorProto(
        name=f"mlmesh_vectors_packed_{number}.proto", package="mlmesh_vectors.internal"
    )
    file.syntax = "proto3"
    reader = file.message_type.add(name="PackedReader")
    reader.field.add(
        name="values",
        number=number,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("mlmesh_vectors.internal.PackedReader")
    )


def _vector_violations(
    vector: np.ndarray, spec: CollectionSpec, field: str
) -> list[FieldViolation]:
    if vector.shape[0] != spec.dimension:
        return [
            FieldViolation(
                field,
                f"has {vector.shape[0]} values; collection {spec.name} has dimension "
                f"{spec.dimension}",
            )
        ]
    if not np.isfinite(vector).all():
        return [FieldViolation(field, "holds NaN or infinite values")]
    if spec.distance is Distance.COSINE and not vector.any():
        return [FieldViolation(field, "is all zeros (no direction to compare by cosine)")]
    return []


def plain(value: Any) -> Any:
    """A Struct's JSON value with integral numbers as ints (Struct keeps
    every number as a double; integer indexes need ints)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _struct_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _struct_value(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_struct_value(v) for v in value.list_value.values]
    if kind == "number_value":
        return plain(value.number_value)
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def payload_of(
    struct: struct_pb2.Struct, field: str
) -> tuple[dict[str, Any], list[FieldViolation]]:
    violations = []
    if struct.ByteSize() > MAX_PAYLOAD_BYTES:
        violations.append(FieldViolation(field, f"is over {MAX_PAYLOAD_BYTES} bytes"))
        return {}, violations
    payload = {k: _struct_value(v) for k, v in struct.fields.items()}
    for key, value in payload.items():
        if key.startswith("_"):
            violations.append(
                FieldViolation(f"{field}.{key[:32]}", "keys starting with '_' are reserved")
            )
        if not _finite(value):
            violations.append(
                FieldViolation(f"{field}.{key[:32]}", "holds a number that is not finite")
            )
    return payload, violations


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a payload value (the engine stores
    JSON, which has neither)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def batch_of(points: Sequence[pb.Point], spec: CollectionSpec) -> Batch:
    """The request's points as one batch, or INVALID_ARGUMENT naming every
    bad point (nothing is written)."""
    violations: list[FieldViolation] = []
    seen: dict[str, int] = {}
    payloads = []
    vectors = np.zeros((len(points), spec.dimension), dtype=np.float32)
    for i, point in enumerate(points):
        field = f"points[{i}]"
        if point.id in seen:
            violations.append(FieldViolation(f"{field}.id", f"repeats points[{seen[point.id]}].id"))
        seen.setdefault(point.id, i)
        vector = packed_floats(point)
        found = _vector_violations(vector, spec, f"{field}.vector")
        violations.extend(found)
        if not found:
            vectors[i] = vector
        payload, bad = payload_of(point.payload, f"{field}.payload")
        violations.extend(bad)
        payloads.append(payload)
    fail(violations, collection=spec.name)
    return Batch([p.id for p in points], vectors, payloads)


def check_unique(ids: Iterable[str], field: str) -> None:
    seen: dict[str, int] = {}
    violations = []
    for i, point_id in enumerate(ids):
        if point_id in seen:
            violations.append(FieldViolation(f"{field}[{i}]", f"repeats {field}[{seen[point_id]}]"))
        seen.setdefault(point_id, i)
    fail(violations)


def point_message(record: Record) -> pb.Point:
    point = pb.Point(id=record.id)
    if record.payload is not None:
        point.payload.update(record.payload)
    if record.vector is not None:
        point.vector.extend(record.vector.tolist())
    return point


def add_hits(points: Any, hits: Iterable[Hit]) -> None:
    """Appends each hit to ``points`` (a response's repeated ScoredPoint),
    each made in place (a message made apart would be copied in)."""
    add = points.add
    for hit in hits:
        if hit.payload is None and hit.vector is None:
            add(id=hit.id, score=hit.score)
            continue
        message = add(id=hit.id, score=hit.score)
        if hit.payload is not None:
            message.payload.update(hit.payload)
        if hit.vector is not None:
            message.vector.extend(hit.vector.tolist())


# ---- filters ---------------------------------------------------------------------


def filter_of(message: pb.Filter, spec: CollectionSpec, field: str = "filter") -> Filter | None:
    """The engine's filter, or None for an empty one; INVALID_ARGUMENT for a
    key the collection does not index or a value not of its type."""
    result, violations = _filter_checked(message, spec, field)
    fail(violations, collection=spec.name)
    return result


def _filter_checked(
    message: pb.Filter, spec: CollectionSpec, field: str
) -> tuple[Filter | None, list[FieldViolation]]:
    violations: list[FieldViolation] = []
    must = tuple(
        _condition(c, spec, f"{field}.must[{i}]", violations) for i, c in enumerate(message.must)
    )
    must_not = tuple(
        _condition(c, spec, f"{field}.must_not[{i}]", violations)
        for i, c in enumerate(message.must_not)
    )
    result = Filter(must, must_not)
    return (result if result else None), violations


def batch_queries_of(
    items: Sequence[Any], spec: CollectionSpec
) -> tuple[np.ndarray, list[Filter | None]]:
    """A SearchBatch's queries' vectors (one float32 matrix) and filters, or
    one INVALID_ARGUMENT naming every bad vector and filter (in query order).
    A filter the batch repeats is converted once (one Filter object for
    every query with it)."""
    vectors, bad_vectors = vectors_of(items, spec, lambda i: f"queries[{i}].vector")
    violations: list[FieldViolation] = []
    filters: list[Filter | None] = []
    # Converted filters by their serialized form (good ones only: a bad
    # one is reported for each query with it, under that query's field).
    seen: dict[bytes, Filter | None] = {}
    for i, item in enumerate(items):
        if i in bad_vectors:
            violations.append(bad_vectors[i])
        if not item.HasField("filter"):
            filters.append(None)
            continue
        key = item.filter.SerializeToString(deterministic=True)
        if key in seen:
            filters.append(seen[key])
            continue
        result, bad = _filter_checked(item.filter, spec, f"queries[{i}].filter")
        if bad:
            violations.extend(bad)
        else:
            seen[key] = result
        filters.append(result)
    fail(violations, collection=spec.name)
    return vectors, filters


def _matchable(value: Any, kind: PayloadType) -> bool:
    if kind == "keyword":
        return isinstance(value, str) and len(value) <= 1024
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    return False  # float: ranges only


def _condition(
    message: pb.Condition, spec: CollectionSpec, field: str, violations: list[FieldViolation]
) -> Condition:
    kind = spec.index_type(message.key)
    test = message.WhichOneof("test")
    if kind is None:
        indexed = ", ".join(k for k, _ in spec.payload_indexes) or "none"
        violations.append(
            FieldViolation(
                f"{field}.key",
                f"{message.key[:64]!r} is not an indexed payload field of collection "
                f"{spec.name} (indexed: {indexed[:200]})",
            )
        )
        return Condition(message.key)
    if test is None:
        violations.append(FieldViolation(field, "sets none of equals, any_of and range"))
        return Condition(message.key)
    if test == "equals":
        value = _struct_value(message.equals)
        if not _matchable(value, kind):
            violations.append(FieldViolation(f"{field}.equals", f"is not a {kind} value to match"))
        return Condition(message.key, equals=value)
    if test == "any_of":
        values = [_struct_value(v) for v in message.any_of.values]
        if kind == "bool" or not all(_matchable(v, kind) for v in values):
            violations.append(
                FieldViolation(f"{field}.any_of", f"holds values that are not {kind}")
            )
        return Condition(message.key, any_of=tuple(values))
    bounds = message.range
    if kind not in ("integer", "float"):
        violations.append(FieldViolation(f"{field}.range", f"{kind} fields have no range"))
    set_bounds = {
        name: getattr(bounds, name) for name in ("gt", "gte", "lt", "lte") if bounds.HasField(name)
    }
    if not set_bounds:
        violations.append(FieldViolation(f"{field}.range", "sets no bound"))
    if not all(math.isfinite(v) for v in set_bounds.values()):
        violations.append(FieldViolation(f"{field}.range", "bounds must be finite"))
    return Condition(message.key, **set_bounds)

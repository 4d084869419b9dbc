"""FeatureServicer: mlmesh.features.v1.FeatureService over the store.

Messages in, store calls out, messages back. Field rules (lengths, name
patterns, 1 to 1000 entity rows) are the contract's, checked by the chassis
before a handler runs; what only the definitions in force can say (does
this view, feature or join key exist, is this value of the join key's type)
is checked here, every problem a BadRequest violation on its field.
Parsing a source and every Feast call run off the event loop: parsing on a
worker thread, Feast on its own thread.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pandas as pd
from google.protobuf import any_pb2, duration_pb2, struct_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from mlmesh.common.v1 import errors_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh_chassis.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    shorten,
)
from mlmesh_chassis.pagination import offset_page

from mlmesh_features import expressions as ex
from mlmesh_features.batch import EVENT_TIMESTAMP
from mlmesh_features.definitions import Definitions, parse
from mlmesh_features.online import (
    NOT_FOUND,
    NULL,
    OUTSIDE_MAX_AGE,
    PRESENT,
    ViewRows,
    decode_value,
)
from mlmesh_features.operations import (
    HISTORICAL_FEATURES,
    MAX_TIME_NS,
    HistoricalRequest,
    MaterializeRequest,
    Operation,
    OperationError,
    OperationRunner,
)
from mlmesh_features.store import Change, FeastThread, FeatureStore
from mlmesh_features.streaming.eventlog import EventLog
from mlmesh_features.telemetry import ONLINE_READ_SECONDS

T = TypeVar("T")

# Integers beyond +-2^53 do not survive a double: they travel as decimal strings.
MAX_SAFE_INTEGER = 2**53
# Event times IngestEvents accepts: from the epoch to a little after the
# server's clock (an event far in the future would move the stream's
# watermark past every event to come, making them all late).
EARLIEST_EVENT = datetime(1970, 1, 1, tzinfo=UTC)
MAX_EVENT_CLOCK_SKEW = timedelta(minutes=5)
# Violations one bad IngestEvents reports (the first ones found).
MAX_VIOLATIONS = 50

_OBJECT_TYPES = {
    "entity": pb.OBJECT_TYPE_ENTITY,
    "data_source": pb.OBJECT_TYPE_DATA_SOURCE,
    "feature_view": pb.OBJECT_TYPE_FEATURE_VIEW,
    "feature_service": pb.OBJECT_TYPE_FEATURE_SERVICE,
}
_ACTIONS = {
    "created": pb.CHANGE_ACTION_CREATED,
    "updated": pb.CHANGE_ACTION_UPDATED,
    "deleted": pb.CHANGE_ACTION_DELETED,
    "unchanged": pb.CHANGE_ACTION_UNCHANGED,
}
_STATUSES = {
    "present": pb.FEATURE_STATUS_PRESENT,
    "not_found": pb.FEATURE_STATUS_NOT_FOUND,
    "null": pb.FEATURE_STATUS_NULL_VALUE,
    "outside_max_age": pb.FEATURE_STATUS_OUTSIDE_MAX_AGE,
}
_VALUE_TYPES = {
    ex.INT64: pb.VALUE_TYPE_INT64,
    ex.DOUBLE: pb.VALUE_TYPE_DOUBLE,
    ex.STRING: pb.VALUE_TYPE_STRING,
    ex.BOOL: pb.VALUE_TYPE_BOOL,
}


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store that cannot be reached raises (Redis down, SQLite locked)."""
    errors: list[type[BaseException]] = [sqlite3.OperationalError, OSError, TimeoutError]
    try:
        import redis

        errors.append(redis.exceptions.ConnectionError)
        errors.append(redis.exceptions.TimeoutError)
    except ImportError:  # pragma: no cover - Feast brings redis
        pass
    return tuple(errors)


STORE_ERRORS = _store_errors()


class FeatureServicer(features_service_pb2_grpc.FeatureServiceServicer):
    def __init__(
        self,
        store: FeatureStore,
        feast: FeastThread,
        timeout_s: float = 10.0,
        operations: OperationRunner | None = None,
    ) -> None:
        self.operations = operations
        self.store = store
        self.feast = feast
        self.timeout_s = timeout_s
        self._apply_lock = asyncio.Lock()
        self.eventlog = EventLog(store.root)

    async def _on_store(self, fn: Callable[..., T], *args: Any, bounded: bool = True) -> T:
        """``fn`` on the Feast thread; UNAVAILABLE with RetryInfo when the
        store cannot be reached. ``bounded``: also when it takes longer than
        the store timeout (reads and writes a retry can repeat; never an
        apply, which would go on after the caller was told it failed)."""
        return await self._store_call(self.feast.run(fn, *args), bounded)

    async def _store_call(self, call: Awaitable[T], bounded: bool = True) -> T:
        """``call`` to the store, as ``_on_store`` bounds it and reports it
        failing (reads that do not need the Feast thread)."""
        try:
            return await (asyncio.wait_for(call, self.timeout_s) if bounded else call)
        except STORE_ERRORS as error:
            raise Unavailable(
                f"the online store is unreachable ({type(error).__name__})", retry_after_s=1.0
            ) from error

    # ---- definitions ---------------------------------------------------------------

    async def ApplyFeatureDefinitions(self, request, context):  # type: ignore[no-untyped-def]
        defs = await asyncio.to_thread(parse, request.source)
        async with self._apply_lock:
            applied = await self._on_store(
                lambda: self.store.apply(
                    request.source, defs, prune=request.prune, validate_only=request.validate_only
                ),
                bounded=False,
            )
        return rpc.ApplyFeatureDefinitionsResponse(
            changes=[_change(c) for c in applied.changes], revision=applied.revision
        )

    async def ListFeatureViews(self, request, context):  # type: ignore[no-untyped-def]
        defs = self.store.definitions
        views = [
            v
            for _, v in sorted(defs.feature_views.items())
            if (not request.entity or request.entity in v.entities)
            and all(v.tags.get(k) == value for k, value in request.tags.items())
        ]
        page, token = offset_page(views, request.page_size, request.page_token)
        return rpc.ListFeatureViewsResponse(
            feature_views=[_view_message(defs, v.name) for v in page], next_page_token=token
        )

    # ---- online values ----------------------------------------------------------------

    async def GetOnlineFeatures(self, request, context):  # type: ignore[no-untyped-def]
        defs = self.store.definitions
        wanted = _selection(defs, request)
        by_view: dict[str, list[str]] = {}
        for view, feature in wanted:
            by_view.setdefault(view, []).append(feature)
        keys_needed = {key for view in by_view for key in defs.join_keys(defs.feature_views[view])}
        rows = _entity_rows(defs, request.entity_rows, keys_needed, by_view)
        found: dict[str, ViewRows] = {}
        for view, features in by_view.items():
            view_keys = defs.join_keys(defs.feature_views[view])
            entities = [tuple(row[k] for k in view_keys) for row in rows]
            started = time.perf_counter()
            try:
                found[view] = await self._store_call(self.store.read_rows(view, features, entities))
            finally:
                ONLINE_READ_SECONDS.labels(view).observe(time.perf_counter() - started)
        names = [f"{v}__{f}" if request.full_feature_names else f for v, f in wanted]
        return _online_response(names, wanted, by_view, found, len(rows))

    async def Push(self, request, context):  # type: ignore[no-untyped-def]
        defs = self.store.definitions
        view = defs.feature_views.get(request.feature_view)
        if view is None:
            raise NotFound("feature view", request.feature_view)
        types = {
            defs.entities[e].join_key: defs.entities[e].value_type for e in view.entities
        } | view.feature_types()
        violations: list[FieldViolation] = []
        records = []
        for index, row in enumerate(request.rows):
            record = _typed_values(
                row.values, types, f"rows[{index}].values", f"view {view.name!r}", violations
            )
            record[EVENT_TIMESTAMP] = row.event_time.ToDatetime(UTC)
            records.append(record)
        if violations:
            raise _bad_request(violations)
        frame = pd.DataFrame.from_records(records)
        await self._on_store(self.store.write, view.name, frame)
        keys = defs.join_keys(view)
        return rpc.PushResponse(written_rows=int(frame.drop_duplicates(keys).shape[0]))

    async def IngestEvents(self, request, context):  # type: ignore[no-untyped-def]
        source = self.store.definitions.sources.get(request.source)
        if source is None:
            raise NotFound("data source", request.source)
        if source.kind != "stream":
            raise FailedPrecondition(
                f"source {source.name!r} is a batch source: only stream sources take events",
                source=source.name,
            )
        violations: list[FieldViolation] = []
        events = []
        latest = datetime.now(UTC) + MAX_EVENT_CLOCK_SKEW
        for index, event in enumerate(request.events):
            where = f"events[{index}]"
            record = _typed_values(
                event.values,
                source.columns,
                f"{where}.values",
                f"source {source.name!r}",
                violations,
            )
            for name, value in record.items():
                if isinstance(value, float) and not math.isfinite(value):
                    violations.append(FieldViolation(f"{where}.values.{name}", "a finite number"))
            seconds = event.event_time.seconds
            if not EARLIEST_EVENT.timestamp() <= seconds <= latest.timestamp():
                violations.append(
                    FieldViolation(
                        f"{where}.event_time",
                        f"a time from {EARLIEST_EVENT:%Y-%m-%d} to "
                        f"{int(MAX_EVENT_CLOCK_SKEW.total_seconds())}s after the server's clock",
                    )
                )
            else:
                record[source.timestamp_field] = event.event_time.ToDatetime(UTC)
            if len(violations) >= MAX_VIOLATIONS:
                break
            events.append(record)
        if violations:
            raise _bad_request(violations[:MAX_VIOLATIONS])
        first, count = await asyncio.to_thread(self.eventlog.append, source, events)
        return rpc.IngestEventsResponse(accepted_events=count, first_sequence=first)

    # ---- long-running operations ------------------------------------------------------

    def _runner(self) -> OperationRunner:
        assert self.operations is not None, "the operations runner is not configured"
        return self.operations

    async def Materialize(self, request, context):  # type: ignore[no-untyped-def]
        defs = self.store.definitions
        violations = []
        for index, name in enumerate(request.feature_views):
            view = defs.feature_views.get(name)
            if view is None:
                violations.append(
                    FieldViolation(f"feature_views[{index}]", f"unknown feature view {name!r}")
                )
            elif not view.online:
                violations.append(
                    FieldViolation(f"feature_views[{index}]", f"view {name!r} is not served online")
                )
        views = list(request.feature_views) or [
            name for name, view in sorted(defs.feature_views.items()) if view.online
        ]
        if not views and not violations:
            violations.append(FieldViolation("feature_views", "no online feature view is defined"))
        start = end = _ns(datetime.now(UTC))
        if request.HasField("end_time"):
            # A window ending after now is still open: never a value yet.
            end = min(end, _time_ns(request.end_time, "end_time", violations))
        start_ns = None
        if request.HasField("start_time"):
            start_ns = start = _time_ns(request.start_time, "start_time", violations)
            if start > end:
                violations.append(
                    FieldViolation("start_time", "is after end_time (or after now when unset)")
                )
        if violations:
            raise _bad_request(violations)
        operation = await self._runner().materialize(MaterializeRequest(views, start_ns, end))
        return rpc.MaterializeResponse(operation=_operation_message(operation))

    async def GetHistoricalFeatures(self, request, context):  # type: ignore[no-untyped-def]
        defs = self.store.definitions
        wanted = _selection(defs, request, online=False)
        by_view: dict[str, list[str]] = {}
        for view, feature in wanted:
            by_view.setdefault(view, []).append(feature)
        keys_needed = {key for view in by_view for key in defs.join_keys(defs.feature_views[view])}
        # Up to 100,000 rows: checked on a worker thread, not the event loop.
        columns = await asyncio.to_thread(
            _timed_entity_columns, defs, request.entity_rows, keys_needed, by_view
        )
        operation = await self._runner().historical(
            HistoricalRequest(wanted, request.full_feature_names, columns)
        )
        return rpc.GetHistoricalFeaturesResponse(operation=_operation_message(operation))

    async def GetOperation(self, request, context):  # type: ignore[no-untyped-def]
        operation = await self._runner().get(request.name.removeprefix("operations/"))
        if operation is None:
            raise NotFound("operation", request.name)
        return rpc.GetOperationResponse(operation=_operation_message(operation))

    async def ListOperations(self, request, context):  # type: ignore[no-untyped-def]
        operations, token = await self._runner().page(request.page_size, request.page_token)
        return rpc.ListOperationsResponse(
            operations=[_operation_message(o) for o in operations], next_page_token=token
        )

    async def CancelOperation(self, request, context):  # type: ignore[no-untyped-def]
        operation = await self._runner().cancel(request.name.removeprefix("operations/"))
        if operation is None:
            raise NotFound("operation", request.name)
        return rpc.CancelOperationResponse(operation=_operation_message(operation))


# ---- checks and conversions ---------------------------------------------------------------


def _typed_values(
    values: Any, types: dict[str, str], path: str, owner: str, violations: list[FieldViolation]
) -> dict[str, Any]:
    """``values`` (a map of name to struct Value) as Python values of
    ``types``: every name required, no other; problems go to ``violations``
    on ``path.<name>``."""
    record: dict[str, Any] = {}
    unknown = sorted(values.keys() - types.keys())
    if unknown:
        violations.append(
            FieldViolation(path, f"{owner} has no column {shorten(unknown[0], 40)!r}")
        )
    for name, kind in types.items():
        where = f"{path}.{name}"
        if name not in values:
            violations.append(FieldViolation(where, "required"))
            continue
        try:
            record[name] = _python_value(values[name], kind)
        except ValueError as error:
            violations.append(FieldViolation(where, str(error)))
    return record


def _bad_request(violations: list[FieldViolation]) -> InvalidArgument:
    return InvalidArgument.listing(violations, 1, field=violations[0].field)


def _selection(defs: Definitions, request: Any, online: bool = True) -> list[tuple[str, str]]:
    """The (view, feature) pairs a request's ``selection`` names (a
    GetOnlineFeatures or GetHistoricalFeatures request); ``online``: only
    views served online."""
    if request.WhichOneof("selection") == "feature_service":
        service = defs.feature_services.get(request.feature_service)
        if service is None:
            raise NotFound("feature service", request.feature_service)
        return list(service.features)
    wanted: list[tuple[str, str]] = []
    violations = []
    features_of: dict[str, dict[str, str]] = {}  # a view's features, built once a call
    for index, reference in enumerate(request.features.references):
        view_name, _, feature = reference.partition(":")
        view = defs.feature_views.get(view_name)
        if view is not None and view_name not in features_of:
            features_of[view_name] = view.feature_types()
        if view is None:
            violations.append(
                FieldViolation(
                    f"features.references[{index}]", f"unknown feature view {view_name!r}"
                )
            )
        elif feature not in features_of[view_name]:
            violations.append(
                FieldViolation(
                    f"features.references[{index}]",
                    f"view {view_name!r} has no feature {feature!r}",
                )
            )
        elif online and not view.online:
            violations.append(
                FieldViolation(
                    f"features.references[{index}]", f"view {view_name!r} is not served online"
                )
            )
        elif (view_name, feature) not in wanted:
            wanted.append((view_name, feature))
    if violations:
        raise _bad_request(violations)
    return wanted


def _entity_rows(
    defs: Definitions, rows: Any, keys_needed: set[str], by_view: dict[str, list[str]]
) -> list[dict[str, Any]]:
    kinds = {
        defs.entities[e].join_key: defs.entities[e].value_type
        for view in by_view
        for e in defs.feature_views[view].entities
    }
    out = []
    violations = []
    for index, row in enumerate(rows):
        values: dict[str, Any] = {}
        for key in sorted(keys_needed):
            where = f"entity_rows[{index}].join_keys.{key}"
            if key not in row.join_keys:
                violations.append(FieldViolation(where, "required by the requested features"))
                continue
            try:
                values[key] = _python_value(row.join_keys[key], kinds[key])
            except ValueError as error:
                violations.append(FieldViolation(where, str(error)))
        out.append(values)
    if violations:
        raise _bad_request(violations)
    return out


def _python_value(value: struct_pb2.Value, kind: str) -> Any:
    """``value`` as a Python value of ``kind``; ValueError when it is not one."""
    which = value.WhichOneof("kind")
    if which == "null_value" and kind != ex.INT64:
        return None
    if kind == ex.INT64:
        if (
            which == "number_value"
            and value.number_value.is_integer()
            and abs(value.number_value) <= MAX_SAFE_INTEGER
        ):
            return int(value.number_value)
        if which == "string_value" and _is_integer(value.string_value):
            return int(value.string_value)
        raise ValueError("an integer (beyond +-2^53 as a decimal string)")
    if kind == ex.DOUBLE and which == "number_value":
        return value.number_value
    if kind == ex.STRING and which == "string_value":
        return value.string_value
    if kind == ex.BOOL and which == "bool_value":
        return value.bool_value
    raise ValueError(f"a {kind}")


def _is_integer(text: str) -> bool:
    body = text[1:] if text[:1] == "-" else text
    return (
        0 < len(body) <= 19 and body.isascii() and body.isdigit() and -(2**63) <= int(text) < 2**63
    )


def _struct_value(value: Any) -> struct_pb2.Value:
    if value is None:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            return struct_pb2.Value(string_value=str(value))
        return struct_pb2.Value(number_value=float(value))
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return struct_pb2.Value(string_value=str(value))
        return struct_pb2.Value(number_value=value)
    if isinstance(value, datetime):
        return struct_pb2.Value(string_value=value.isoformat())
    return struct_pb2.Value(string_value=str(value))


# ---- GetOnlineFeatures' response, written as protobuf wire bytes ------------------------------
#
# A response holds entities x features FeatureValues: building them as
# messages costs microseconds each. They are written as bytes instead, from
# the store's serialized feast Values (a double, bool or string Value maps
# onto a google.protobuf.Value by changing its field tag) and the stored
# event time (a serialized Timestamp), then parsed once into the response
# message in C. test_online_response_bytes checks them against messages.

_LENGTHS = [bytes([n]) for n in range(128)]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: ``tag``, the payload's length, the payload."""
    size = len(payload)
    return tag + (_LENGTHS[size] if size < 128 else _varint(size)) + payload


_VALUE = b"\x0a"  # FeatureValue.value; also FeatureRow.values, and feature_names
_EVENT_TIME = b"\x1a"  # FeatureValue.event_time
_ROW = b"\x12"  # GetOnlineFeaturesResponse.rows
_NULL = _field(_VALUE, struct_pb2.Value(null_value=struct_pb2.NULL_VALUE).SerializeToString())
_STATUS = {
    name: pb.FeatureValue(status=number).SerializeToString() for name, number in _STATUSES.items()
}
_NOT_FOUND_VALUE = _field(_VALUE, _NULL + _STATUS[NOT_FOUND])


def _struct_value_bytes(raw: bytes) -> bytes | None:
    """The google.protobuf.Value bytes of a serialized feast Value; None
    when it is a null."""
    if raw:
        tag = raw[0]
        if _is_finite_double(raw):
            return b"\x11" + raw[1:]  # double_val -> number_value
        if tag == 0x38:
            return b"\x20" + raw[1:]  # bool_val -> bool_value
        if tag == 0x12:
            return b"\x1a" + raw[1:]  # string_val -> string_value
    value = decode_value(raw)
    return None if value is None else _struct_value(value).SerializeToString()


def _is_finite_double(raw: bytes) -> bool:
    """Whether ``raw`` is a feast Value holding a double that is neither NaN
    nor infinite (its exponent's bits not all set)."""
    return (
        len(raw) == 9 and raw[0] == 0x29 and not (raw[8] & 0x7F == 0x7F and raw[7] & 0xF0 == 0xF0)
    )


def _view_values(found: ViewRows) -> list[list[bytes]]:
    """Per entity, a FeatureRow.values field per requested feature of the
    view, statuses as ``ViewRows`` states them."""
    out = []
    for stamp, stale, raws in zip(found.stamps, found.stale, found.values, strict=True):
        if stamp is None:
            out.append([_NOT_FOUND_VALUE] * len(raws))
            continue
        event_time = _field(_EVENT_TIME, stamp)
        if stale:
            old = _field(_VALUE, _NULL + _STATUS[OUTSIDE_MAX_AGE] + event_time)
            out.append([_NOT_FOUND_VALUE if raw is None else old for raw in raws])
            continue
        present = _STATUS[PRESENT] + event_time
        null = _field(_VALUE, _NULL + _STATUS[NULL] + event_time)
        # A FeatureValue holding a number, up to the double's 8 bytes: the
        # common case, one concatenation per value.
        number = _VALUE + _varint(11 + len(present)) + b"\x0a\x09\x11"
        values = []
        for raw in raws:
            if raw is None:
                values.append(_NOT_FOUND_VALUE)
            elif (
                len(raw) == 9
                and raw[0] == 0x29
                and not (raw[8] & 0x7F == 0x7F and raw[7] & 0xF0 == 0xF0)
            ):
                values.append(number + raw[1:] + present)  # _is_finite_double, inlined
            else:
                value = _struct_value_bytes(raw)
                values.append(
                    null if value is None else _field(_VALUE, _field(_VALUE, value) + present)
                )
        out.append(values)
    return out


def _online_response(
    names: list[str],
    wanted: list[tuple[str, str]],
    by_view: dict[str, list[str]],
    found: dict[str, ViewRows],
    entities: int,
) -> rpc.GetOnlineFeaturesResponse:
    parts = [_field(_VALUE, name.encode()) for name in names]
    values = {view: _view_values(rows) for view, rows in found.items()}
    if len(values) == 1:
        # One view, its features in the request's order: rows as they are.
        rows = next(iter(values.values()))
        parts.extend(_field(_ROW, b"".join(row)) for row in rows)
    else:
        columns = [(values[view], by_view[view].index(feature)) for view, feature in wanted]
        parts.extend(
            _field(_ROW, b"".join(view[index][column] for view, column in columns))
            for index in range(entities)
        )
    return rpc.GetOnlineFeaturesResponse.FromString(b"".join(parts))


def _change(change: Change) -> pb.ObjectChange:
    return pb.ObjectChange(
        object_type=_OBJECT_TYPES[change.kind], name=change.name, action=_ACTIONS[change.action]
    )


def _view_message(defs: Definitions, name: str) -> pb.FeatureView:
    view = defs.feature_views[name]
    message = pb.FeatureView(
        name=view.name,
        description=view.description,
        entities=list(view.entities),
        features=[
            pb.Feature(name=n, value_type=_VALUE_TYPES[t]) for n, t in view.feature_types().items()
        ],
        source_kind=pb.SOURCE_KIND_STREAM
        if defs.sources[view.source].kind == "stream"
        else pb.SOURCE_KIND_BATCH,
        online=view.online,
        tags=view.tags,
    )
    if view.ttl:
        message.ttl.CopyFrom(duration_pb2.Duration(seconds=int(view.ttl.total_seconds())))
    return message


# ---- operations ---------------------------------------------------------------------------

_OPERATION_KINDS = {
    "materialize": pb.OPERATION_KIND_MATERIALIZE,
    HISTORICAL_FEATURES: pb.OPERATION_KIND_HISTORICAL_FEATURES,
}
_OPERATION_STATES = {
    "pending": pb.OPERATION_STATE_PENDING,
    "running": pb.OPERATION_STATE_RUNNING,
    "succeeded": pb.OPERATION_STATE_SUCCEEDED,
    "failed": pb.OPERATION_STATE_FAILED,
    "cancelled": pb.OPERATION_STATE_CANCELLED,
}
ERROR_DOMAIN = "mlmesh.features"


def _ns(when: datetime) -> int:
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def _time_ns(stamp: timestamp_pb2.Timestamp, field: str, violations: list[FieldViolation]) -> int:
    """``stamp`` in ns since the epoch; a violation (and 0) unless it lies
    from the epoch to 2262 (the times a feature row can hold)."""
    if not 0 <= stamp.seconds < MAX_TIME_NS // 1_000_000_000:
        violations.append(FieldViolation(field, "a time from 1970-01-01 to 2262-04-11"))
        return 0
    return int(stamp.ToNanoseconds())


def _timed_entity_columns(
    defs: Definitions, rows: Any, keys_needed: set[str], by_view: dict[str, list[str]]
) -> dict[str, list[Any]]:
    """TimedEntityRows as columns (each join key, then EVENT_TIMESTAMP in
    ns), checked like GetOnlineFeatures' entity rows; every problem a
    violation on its field."""
    violations: list[FieldViolation] = []
    times = [
        _time_ns(row.event_time, f"entity_rows[{index}].event_time", violations)
        for index, row in enumerate(rows)
    ]
    try:
        values = _entity_rows(defs, rows, keys_needed, by_view)
    except InvalidArgument as error:
        violations = [*error.violations, *violations]
        values = []
    if violations:
        violations.sort(key=lambda v: _row_index(v.field))
        raise _bad_request(violations)
    columns: dict[str, list[Any]] = {key: [v[key] for v in values] for key in sorted(keys_needed)}
    columns[EVENT_TIMESTAMP] = times
    return columns


def _row_index(field: str) -> int:
    """The row number in ``entity_rows[N]...`` (violations in row order)."""
    head = field.removeprefix("entity_rows[")
    number = head.partition("]")[0]
    return int(number) if number.isdigit() else -1


def _operation_message(operation: Operation) -> pb.Operation:
    metadata = pb.OperationMetadata(
        kind=_OPERATION_KINDS[operation.kind],
        state=_OPERATION_STATES[operation.state],
        create_time=_ns_timestamp(operation.create_ns),
        update_time=_ns_timestamp(operation.update_ns),
        feature_views=operation.feature_views,
        total_chunks=operation.total_chunks,
        done_chunks=operation.done_chunks,
        rows_written=operation.rows_written,
        resumed_count=operation.resumed_count,
    )
    if operation.end_ns is not None:
        metadata.end_time.CopyFrom(_ns_timestamp(operation.end_ns))
    message = pb.Operation(name=operation.name, metadata=metadata, done=operation.done)
    if not operation.done:
        return message
    if operation.error is not None:
        message.error.CopyFrom(_status(operation.error))
    elif operation.result is not None:
        result = operation.result
        if operation.kind == HISTORICAL_FEATURES:
            message.response.historical_features.CopyFrom(
                pb.HistoricalFeaturesResult(
                    output_uri=result["output_uri"],
                    row_count=result["row_count"],
                    feature_names=result["feature_names"],
                )
            )
        else:
            message.response.materialize.CopyFrom(
                pb.MaterializeResult(
                    rows_written=result["rows_written"],
                    start_time=_ns_timestamp(result["start_ns"]),
                    end_time=_ns_timestamp(result["end_ns"]),
                )
            )
    return message


def _ns_timestamp(ns: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def _status(error: OperationError) -> status_pb2.Status:
    """An operation's error as google.rpc.Status with its ErrorInfo."""
    info = error_details_pb2.ErrorInfo(
        reason=errors_pb2.ErrorReason.Name(error.reason).removeprefix("ERROR_REASON_"),
        domain=ERROR_DOMAIN,
        metadata={shorten(k): shorten(v) for k, v in error.metadata.items()},
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(
        code=code_pb2.Code.Value(error.code), message=error.message, details=[detail]
    )

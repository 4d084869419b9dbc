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
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pandas as pd
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh_chassis.errors import FieldViolation, InvalidArgument, NotFound, Unavailable, shorten
from mlmesh_chassis.pagination import offset_page

from mlmesh_features import expressions as ex
from mlmesh_features.batch import EVENT_TIMESTAMP
from mlmesh_features.definitions import Definitions, parse
from mlmesh_features.store import Change, FeastThread, FeatureStore, OnlineValue

T = TypeVar("T")

# Integers beyond +-2^53 do not survive a double: they travel as decimal strings.
MAX_SAFE_INTEGER = 2**53

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
    def __init__(self, store: FeatureStore, feast: FeastThread, timeout_s: float = 10.0) -> None:
        self.store = store
        self.feast = feast
        self.timeout_s = timeout_s
        self._apply_lock = asyncio.Lock()

    async def _on_store(self, fn: Callable[..., T], *args: Any, bounded: bool = True) -> T:
        """``fn`` on the Feast thread; UNAVAILABLE with RetryInfo when the
        store cannot be reached. ``bounded``: also when it takes longer than
        the store timeout (reads and writes a retry can repeat; never an
        apply, which would go on after the caller was told it failed)."""
        call: Awaitable[T] = self.feast.run(fn, *args)
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
        found: dict[str, list[list[OnlineValue]]] = {}
        for view, features in by_view.items():
            view_keys = defs.join_keys(defs.feature_views[view])
            entity_rows = [{k: row[k] for k in view_keys} for row in rows]
            found[view] = await self._on_store(self.store.read, view, features, entity_rows)
        names = [f"{v}__{f}" if request.full_feature_names else f for v, f in wanted]
        response = rpc.GetOnlineFeaturesResponse(feature_names=names)
        column = {pair: by_view[pair[0]].index(pair[1]) for pair in wanted}
        stamps: dict[datetime, timestamp_pb2.Timestamp] = {}
        for index in range(len(rows)):
            row = response.rows.add()
            for view, feature in wanted:
                found_value = found[view][index][column[(view, feature)]]
                value = row.values.add(
                    status=_STATUSES[found_value.status], value=_struct_value(found_value.value)
                )
                if found_value.event_time is not None:
                    stamp = stamps.get(found_value.event_time)
                    if stamp is None:
                        stamp = stamps[found_value.event_time] = _timestamp(found_value.event_time)
                    value.event_time.CopyFrom(stamp)
        return response

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
            record: dict[str, Any] = {}
            unknown = sorted(row.values.keys() - types.keys())
            if unknown:
                violations.append(
                    FieldViolation(
                        f"rows[{index}].values",
                        f"view {view.name!r} has no column {shorten(unknown[0], 40)!r}",
                    )
                )
            for name, kind in types.items():
                where = f"rows[{index}].values.{name}"
                if name not in row.values:
                    violations.append(FieldViolation(where, "required"))
                    continue
                try:
                    record[name] = _python_value(row.values[name], kind)
                except ValueError as error:
                    violations.append(FieldViolation(where, str(error)))
            record[EVENT_TIMESTAMP] = row.event_time.ToDatetime(UTC)
            records.append(record)
        if violations:
            raise _bad_request(violations)
        frame = pd.DataFrame.from_records(records)
        await self._on_store(self.store.write, view.name, frame)
        keys = defs.join_keys(view)
        return rpc.PushResponse(written_rows=int(frame.drop_duplicates(keys).shape[0]))


# ---- checks and conversions ---------------------------------------------------------------


def _bad_request(violations: list[FieldViolation]) -> InvalidArgument:
    return InvalidArgument.listing(violations, 1, field=violations[0].field)


def _selection(defs: Definitions, request: rpc.GetOnlineFeaturesRequest) -> list[tuple[str, str]]:
    if request.WhichOneof("selection") == "feature_service":
        service = defs.feature_services.get(request.feature_service)
        if service is None:
            raise NotFound("feature service", request.feature_service)
        return list(service.features)
    wanted: list[tuple[str, str]] = []
    violations = []
    for index, reference in enumerate(request.features.references):
        view_name, _, feature = reference.partition(":")
        view = defs.feature_views.get(view_name)
        if view is None:
            violations.append(
                FieldViolation(
                    f"features.references[{index}]", f"unknown feature view {view_name!r}"
                )
            )
        elif feature not in view.feature_types():
            violations.append(
                FieldViolation(
                    f"features.references[{index}]",
                    f"view {view_name!r} has no feature {feature!r}",
                )
            )
        elif not view.online:
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


def _timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when.astimezone(UTC).replace(tzinfo=None))
    return stamp


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

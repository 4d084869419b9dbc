"""Feature definitions: the mlmesh feature DSL, in YAML.

One document declares entities, sources, feature views and feature
services::

    entities:
      - name: user
        join_key: user_id
        value_type: int64            # int64 | string
    sources:
      - name: purchases
        kind: stream                 # batch (a parquet path) | stream (events)
        path: data/purchases.parquet # batch data, or the stream's backfill
        timestamp_field: event_time
        columns: {user_id: int64, amount: double, category: string}
    feature_views:
      - name: user_purchases         # row features: one expression per column
        entities: [user]
        source: purchases
        ttl: 2d
        features:
          - {name: amount, type: double, expression: amount}
          - {name: big, type: bool, expression: "amount > 100"}
      - name: user_spend             # windowed aggregations, in event time
        entities: [user]
        source: purchases
        step: 1h                     # window ends every hour (slide)
        ttl: 2d
        aggregations:
          - {name: spend_1d, function: sum, column: amount, window: 1d}
          - {name: purchases_1h, function: count, window: 1h}   # tumbling
    feature_services:
      - {name: fraud_model, features: ["user_spend:spend_1d", "user_purchases"]}

YAML, not Python: definitions arrive over the network (ApplyFeatureDefinitions)
and are never executed. A view holds row features or aggregations, not both:
row features have a value at each event's time, aggregations at each window
end (``step`` apart; a feature's ``window`` is how far back it reaches, so
``window == step`` is a tumbling window and a longer one slides).

``parse`` returns the definitions or raises ``InvalidArgument`` with one
BadRequest violation per problem, each on its path (``feature_views[1].
aggregations[0].column``) and each description starting ``line:column`` of
the source. Nothing is partly accepted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import yaml
from mlmesh_chassis.errors import FieldViolation, InvalidArgument, shorten

from mlmesh_features import expressions as ex

MAX_SOURCE_BYTES = 1 << 20
MAX_DEPTH = 12
# Each section of a document and the kind of object its items declare (the
# kinds the diff reports: mlmesh.features.v1.ObjectType), in apply order.
SECTION_KINDS = {
    "entities": "entity",
    "sources": "data_source",
    "feature_views": "feature_view",
    "feature_services": "feature_service",
}
MAX_OBJECTS = {
    "entities": 100,
    "sources": 100,
    "feature_views": 500,
    "feature_services": 500,
}
MAX_FEATURES_PER_VIEW = 500
MAX_COLUMNS = 500
MAX_WINDOW = timedelta(days=366)
# Window ends one event counts towards (window / step): bounds the batch
# computation's work per event and the Flink job's state.
MAX_ENDS_PER_WINDOW = 1000
MAX_VIOLATIONS = 50

NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
DURATION = re.compile(r"([1-9][0-9]{0,5})(s|m|h|d)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
COLUMN_TYPES = (ex.INT64, ex.DOUBLE, ex.STRING, ex.BOOL)
ENTITY_TYPES = (ex.INT64, ex.STRING)
AGGREGATIONS = ("count", "sum", "mean", "min", "max", "last", "count_distinct")


@dataclass(frozen=True)
class Entity:
    name: str
    join_key: str
    value_type: str
    description: str = ""


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "batch" | "stream"
    path: str
    timestamp_field: str
    columns: dict[str, str]


@dataclass(frozen=True)
class RowFeature:
    name: str
    type: str
    expression: ex.Expression
    # The view's other features it reads. A name is the source's column
    # first: a feature may pass a column through under the column's name
    # (``{name: amount, expression: amount}``), and then no other feature can
    # read that feature by its name.
    reads: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Aggregation:
    name: str
    function: str
    column: str  # "" for count
    window: timedelta
    type: str


@dataclass(frozen=True)
class FeatureView:
    name: str
    entities: tuple[str, ...]
    source: str
    ttl: timedelta | None
    online: bool
    tags: dict[str, str]
    description: str
    features: tuple[RowFeature, ...] = ()
    aggregations: tuple[Aggregation, ...] = ()
    step: timedelta | None = None

    @property
    def windowed(self) -> bool:
        return bool(self.aggregations)

    def feature_types(self) -> dict[str, str]:
        """Each feature's name and type, in definition order."""
        if self.windowed:
            return {a.name: a.type for a in self.aggregations}
        return {f.name: f.type for f in self.features}

    def row_order(self) -> list[RowFeature]:
        """Row features in an order where each comes after those it reads."""
        done: dict[str, RowFeature] = {}
        by_name = {f.name: f for f in self.features}

        def visit(feature: RowFeature) -> None:
            if feature.name in done:
                return
            for name in sorted(feature.reads):
                visit(by_name[name])
            done[feature.name] = feature

        for feature in self.features:
            visit(feature)
        return list(done.values())


@dataclass(frozen=True)
class FeatureService:
    name: str
    features: tuple[tuple[str, str], ...]  # (view, feature)
    description: str = ""


@dataclass
class Definitions:
    entities: dict[str, Entity] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)
    feature_views: dict[str, FeatureView] = field(default_factory=dict)
    feature_services: dict[str, FeatureService] = field(default_factory=dict)
    # Each object's definition as written (canonical), for diffs.
    documents: dict[tuple[str, str], Any] = field(default_factory=dict)

    def join_keys(self, view: FeatureView) -> list[str]:
        return [self.entities[e].join_key for e in view.entities]


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``1h``, ``2d``; ValueError otherwise."""
    match = DURATION.fullmatch(text)
    if match is None:
        raise ValueError("a duration like 30s, 15m, 1h or 2d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


# ---- reading the YAML with positions ----------------------------------------------


class _Problems:
    """Violations, each on a path, described from the source position of the
    node at that path (or its nearest parent)."""

    def __init__(self, marks: dict[str, tuple[int, int]]) -> None:
        self.marks = marks
        self.found: list[FieldViolation] = []

    def add(self, path: str, message: str, column_offset: int = 0) -> None:
        probe = path
        while probe not in self.marks and probe:
            probe = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", probe)
        line, column = self.marks.get(probe, (1, 1))
        if len(self.found) < MAX_VIOLATIONS:
            self.found.append(FieldViolation(path, f"{line}:{column + column_offset}: {message}"))


def _marks(node: yaml.Node, path: str, out: dict[str, tuple[int, int]], depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise InvalidArgument.field("source", f"nested deeper than {MAX_DEPTH} levels")
    out[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            _marks(value, f"{path}.{name}" if path else str(name), out, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _marks(item, f"{path}[{index}]", out, depth + 1)


class _NoAnchorsLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing anchors and aliases: expanding them is
    how a small document becomes a huge one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            raise InvalidArgument.field(
                "source",
                f"{mark.line + 1}:{mark.column + 1}: YAML anchors and aliases are not allowed",
            )
        return super().compose_node(parent, index)


def _load(source: str) -> tuple[Any, dict[str, tuple[int, int]]]:
    """The document's data and each path's line:column, from one parse."""
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise InvalidArgument.field("source", f"larger than {MAX_SOURCE_BYTES} bytes")
    loader = _NoAnchorsLoader(source)
    try:
        node = loader.get_single_node()
        marks: dict[str, tuple[int, int]] = {}
        if node is None:
            return None, marks
        _marks(node, "", marks)  # the depth bound, before anything is built
        return loader.construct_document(node), marks
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{mark.line + 1}:{mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise InvalidArgument.field(
            "source", f"{where}not valid YAML ({shorten(problem)})"
        ) from None
    finally:
        loader.dispose()


# ---- parsing and validating ------------------------------------------------------------


def parse(source: str) -> Definitions:
    """The definitions in ``source`` (YAML); InvalidArgument with every
    problem found otherwise."""
    data, marks = _load(source)
    problems = _Problems(marks)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidArgument.field(
            "source", "1:1: a mapping of entities, sources, feature_views and feature_services"
        )
    definitions = Definitions()
    for key in data:
        if key not in MAX_OBJECTS:
            problems.add(str(key), f"unknown section (known: {', '.join(MAX_OBJECTS)})")
    sections = {name: _list(data, name, problems) for name in MAX_OBJECTS}
    for path, item in _items(sections["entities"], "entities", problems):
        _entity(item, path, definitions, problems)
    for path, item in _items(sections["sources"], "sources", problems):
        _source(item, path, definitions, problems)
    for path, item in _items(sections["feature_views"], "feature_views", problems):
        _view(item, path, definitions, problems)
    for path, item in _items(sections["feature_services"], "feature_services", problems):
        _service(item, path, definitions, problems)
    if problems.found:
        raise InvalidArgument.listing(
            problems.found,
            1,
            prefix="the definitions are not valid: ",
            problems=len(problems.found),
        )
    return definitions


def _list(data: dict[str, Any], name: str, problems: _Problems) -> list[Any]:
    value = data.get(name) or []
    if not isinstance(value, list):
        problems.add(name, "a list")
        return []
    if len(value) > MAX_OBJECTS[name]:
        problems.add(name, f"at most {MAX_OBJECTS[name]} items")
        return []
    return value


def _items(
    items: list[Any], section: str, problems: _Problems
) -> Iterator[tuple[str, dict[str, Any]]]:
    for index, item in enumerate(items):
        path = f"{section}[{index}]"
        if not isinstance(item, dict):
            problems.add(path, "a mapping")
            continue
        yield path, item


def _fields(item: dict[str, Any], path: str, allowed: set[str], problems: _Problems) -> None:
    for key in item:
        if key not in allowed:
            problems.add(f"{path}.{key}", f"unknown field (known: {', '.join(sorted(allowed))})")


def _text(
    item: dict[str, Any],
    key: str,
    path: str,
    problems: _Problems,
    *,
    required: bool = True,
    limit: int = 1024,
) -> str:
    value = item.get(key)
    if value is None:
        if required:
            problems.add(f"{path}.{key}", "required")
        return ""
    if not isinstance(value, str) or len(value) > limit:
        problems.add(f"{path}.{key}", f"a string of at most {limit} characters")
        return ""
    return value


def _name(item: dict[str, Any], path: str, problems: _Problems, key: str = "name") -> str:
    value = _text(item, key, path, problems, limit=63)
    if value and NAME.fullmatch(value) is None:
        problems.add(
            f"{path}.{key}",
            f"{shorten(value, 40)!r} is not a name "
            "(lowercase letters, digits, '_', 1 to 63, a letter first)",
        )
        return ""
    return value


def _unique(kind: str, name: str, path: str, taken: dict[str, Any], problems: _Problems) -> bool:
    if not name:
        return False
    if name in taken:
        problems.add(f"{path}.name", f"duplicate {kind} name {name!r}")
        return False
    return True


def _duration(item: dict[str, Any], key: str, path: str, problems: _Problems) -> timedelta | None:
    value = item.get(key)
    if value is None:
        return None
    try:
        duration = parse_duration(str(value)) if isinstance(value, str) else None
    except ValueError:
        duration = None
    if duration is None or duration > MAX_WINDOW:
        problems.add(
            f"{path}.{key}", f"a duration like 30s, 15m, 1h or 2d, at most {MAX_WINDOW.days}d"
        )
        return None
    return duration


def _canonical(item: dict[str, Any]) -> Any:
    return {k: item[k] for k in sorted(item)}


def _entity(item: dict[str, Any], path: str, defs: Definitions, problems: _Problems) -> None:
    _fields(item, path, {"name", "join_key", "value_type", "description"}, problems)
    name = _name(item, path, problems)
    join_key = _name(item, path, problems, "join_key")
    value_type = _text(item, "value_type", path, problems, required=False) or ex.INT64
    if value_type not in ENTITY_TYPES:
        problems.add(f"{path}.value_type", f"one of {', '.join(ENTITY_TYPES)}")
    description = _text(item, "description", path, problems, required=False)
    if _unique("entity", name, path, defs.entities, problems) and join_key:
        defs.entities[name] = Entity(name, join_key, value_type, description)
        defs.documents[("entity", name)] = _canonical(item)


def _source(item: dict[str, Any], path: str, defs: Definitions, problems: _Problems) -> None:
    _fields(item, path, {"name", "kind", "path", "timestamp_field", "columns"}, problems)
    name = _name(item, path, problems)
    kind = _text(item, "kind", path, problems, required=False) or "batch"
    if kind not in ("batch", "stream"):
        problems.add(f"{path}.kind", "batch or stream")
    data_path = _text(item, "path", path, problems, required=kind == "batch", limit=4096)
    timestamp = _name(item, path, problems, "timestamp_field")
    columns = item.get("columns")
    typed: dict[str, str] = {}
    if not isinstance(columns, dict) or not columns:
        problems.add(f"{path}.columns", "a mapping of column name to type")
    elif len(columns) > MAX_COLUMNS:
        problems.add(f"{path}.columns", f"at most {MAX_COLUMNS} columns")
    else:
        for column, kind_of in columns.items():
            if not isinstance(column, str) or NAME.fullmatch(column) is None:
                problems.add(f"{path}.columns", f"{shorten(column, 40)!r} is not a column name")
            elif kind_of not in COLUMN_TYPES:
                problems.add(f"{path}.columns.{column}", f"one of {', '.join(COLUMN_TYPES)}")
            else:
                typed[column] = kind_of
    if timestamp and timestamp in typed:
        problems.add(f"{path}.timestamp_field", "the event time is not also a typed column")
    if _unique("source", name, path, defs.sources, problems):
        defs.sources[name] = Source(name, kind, data_path, timestamp, typed)
        defs.documents[("data_source", name)] = _canonical(item)


def _view(item: dict[str, Any], path: str, defs: Definitions, problems: _Problems) -> None:
    allowed = {
        "name",
        "entities",
        "source",
        "ttl",
        "online",
        "tags",
        "description",
        "features",
        "aggregations",
        "step",
    }
    _fields(item, path, allowed, problems)
    name = _name(item, path, problems)
    entities = item.get("entities")
    if not isinstance(entities, list) or not entities or len(entities) > 4:
        problems.add(f"{path}.entities", "a list of 1 to 4 entity names")
        entities = []
    for index, entity in enumerate(entities):
        if entity not in defs.entities:
            problems.add(f"{path}.entities[{index}]", f"unknown entity {shorten(entity, 40)!r}")
    source_name = _text(item, "source", path, problems, limit=63)
    source = defs.sources.get(source_name)
    if source_name and source is None:
        problems.add(f"{path}.source", f"unknown source {shorten(source_name, 40)!r}")
    ttl = _duration(item, "ttl", path, problems)
    online = item.get("online", True)
    if not isinstance(online, bool):
        problems.add(f"{path}.online", "true or false")
    tags = item.get("tags") or {}
    if (
        not isinstance(tags, dict)
        or len(tags) > 32
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 63 and len(v) <= 256
            for k, v in tags.items()
        )
    ):
        problems.add(f"{path}.tags", "at most 32 string labels (keys 63, values 256 characters)")
        tags = {}
    description = _text(item, "description", path, problems, required=False)
    columns = dict(source.columns) if source is not None else {}
    if source is not None:
        for index, entity in enumerate(entities):
            if entity in defs.entities:
                entity_def = defs.entities[entity]
                key = entity_def.join_key
                if key not in columns:
                    problems.add(
                        f"{path}.entities[{index}]",
                        f"source {source.name!r} has no column {key!r} "
                        f"(the join key of {entity!r})",
                    )
                elif columns[key] != entity_def.value_type:
                    problems.add(
                        f"{path}.entities[{index}]",
                        f"join key {key!r} is {columns[key]} in source {source.name!r}, "
                        f"{entity_def.value_type} in entity {entity!r}",
                    )
    has_rows, has_aggs = "features" in item, "aggregations" in item
    features: tuple[RowFeature, ...] = ()
    aggregations: tuple[Aggregation, ...] = ()
    step = _duration(item, "step", path, problems)
    if has_rows == has_aggs:
        problems.add(path, "a view has either features (row expressions) or aggregations (windows)")
    elif has_rows:
        if "step" in item:
            problems.add(f"{path}.step", "only views with aggregations have a step")
        features = _row_features(
            item.get("features"), f"{path}.features", columns, source is not None, problems
        )
    else:
        if step is None and "step" not in item:
            problems.add(f"{path}.step", "required for aggregations: how far apart window ends are")
        aggregations = _aggregations(
            item.get("aggregations"),
            f"{path}.aggregations",
            columns,
            source is not None,
            step,
            problems,
        )
    if _unique("feature view", name, path, defs.feature_views, problems) and source is not None:
        defs.feature_views[name] = FeatureView(
            name,
            tuple(entities),
            source_name,
            ttl,
            bool(online),
            dict(tags),
            description,
            features,
            aggregations,
            step,
        )
        defs.documents[("feature_view", name)] = _canonical(item)


def _row_features(
    items: Any, path: str, columns: dict[str, str], known_source: bool, problems: _Problems
) -> tuple[RowFeature, ...]:
    if not isinstance(items, list) or not items or len(items) > MAX_FEATURES_PER_VIEW:
        problems.add(path, f"a list of 1 to {MAX_FEATURES_PER_VIEW} features")
        return ()
    parsed: dict[str, tuple[str, RowFeature]] = {}
    for index, item in enumerate(items):
        here = f"{path}[{index}]"
        if not isinstance(item, dict):
            problems.add(here, "a mapping")
            continue
        _fields(item, here, {"name", "type", "expression", "description"}, problems)
        name = _name(item, here, problems)
        kind = _text(item, "type", here, problems, limit=16)
        if kind and kind not in COLUMN_TYPES:
            problems.add(f"{here}.type", f"one of {', '.join(COLUMN_TYPES)}")
            kind = ""
        text = _text(item, "expression", here, problems, limit=ex.MAX_EXPRESSION_CHARS)
        if name in parsed:
            problems.add(f"{here}.name", f"duplicate feature name {name!r}")
            continue
        try:
            expression = ex.parse(text) if text else None
        except ex.ExpressionError as error:
            problems.add(f"{here}.expression", f"{error}", error.column - 1)
            expression = None
        if name and kind and expression is not None:
            parsed[name] = (here, RowFeature(name, kind, expression))
    if not known_source:
        return tuple(feature for _, feature in parsed.values())
    # Names: a source column, else another feature of the view (no cycles).
    for here, feature in parsed.values():
        unknown = sorted(feature.expression.names - columns.keys() - parsed.keys())
        if unknown:
            problems.add(f"{here}.expression", f"unknown column {unknown[0]!r}")
    resolved = {
        name: (
            here,
            replace(f, reads=frozenset(f.expression.names & parsed.keys() - columns.keys())),
        )
        for name, (here, f) in parsed.items()
    }
    cycle = _cycle({name: set(f.reads) for name, (_, f) in resolved.items()})
    if cycle:
        problems.add(
            f"{resolved[cycle[0]][0]}.expression",
            f"features read each other in a cycle: {' -> '.join(cycle)}",
        )
        return ()
    # Types, in dependency order: a feature reads columns and features it follows.
    features = tuple(f for _, f in resolved.values())
    types = dict(columns)
    view = FeatureView("", (), "", None, True, {}, "", features)
    for feature in view.row_order():
        here = resolved[feature.name][0]
        if feature.expression.names - types.keys():
            continue  # reported above
        try:
            found = ex.infer_type(feature.expression, types)
        except ex.ExpressionError as error:
            problems.add(f"{here}.expression", str(error))
            continue
        if found != feature.type and not (found == ex.INT64 and feature.type == ex.DOUBLE):
            problems.add(f"{here}.type", f"the expression is {found}, not {feature.type}")
        if feature.name not in columns:
            types[feature.name] = feature.type
    return features


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle in ``graph`` as a path that returns to its start; [] if none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def _aggregations(
    items: Any,
    path: str,
    columns: dict[str, str],
    known_source: bool,
    step: timedelta | None,
    problems: _Problems,
) -> tuple[Aggregation, ...]:
    if not isinstance(items, list) or not items or len(items) > MAX_FEATURES_PER_VIEW:
        problems.add(path, f"a list of 1 to {MAX_FEATURES_PER_VIEW} aggregations")
        return ()
    out: dict[str, Aggregation] = {}
    for index, item in enumerate(items):
        here = f"{path}[{index}]"
        if not isinstance(item, dict):
            problems.add(here, "a mapping")
            continue
        _fields(item, here, {"name", "function", "column", "window", "description"}, problems)
        name = _name(item, here, problems)
        function = _text(item, "function", here, problems, limit=32)
        if function and function not in AGGREGATIONS:
            problems.add(f"{here}.function", f"one of {', '.join(AGGREGATIONS)}")
            function = ""
        column = _text(
            item, "column", here, problems, required=function not in ("count", ""), limit=63
        )
        if function == "count" and column:
            problems.add(f"{here}.column", "count counts events: it takes no column")
        window = _duration(item, "window", here, problems)
        if "window" not in item:
            problems.add(f"{here}.window", "required")
        if window is not None and step is not None and window < step:
            problems.add(f"{here}.window", "at least the view's step")
            window = None
        elif window is not None and step is not None and window / step > MAX_ENDS_PER_WINDOW:
            problems.add(f"{here}.window", f"at most {MAX_ENDS_PER_WINDOW} steps long")
            window = None
        kind = ""
        if function and known_source:
            if column and column not in columns:
                problems.add(f"{here}.column", f"unknown column {shorten(column, 40)!r}")
            else:
                kind = _aggregate_type(function, columns.get(column, ""))
                if not kind:
                    problems.add(
                        f"{here}.column", f"{function} needs a number, not {columns[column]}"
                    )
        if name in out:
            problems.add(f"{here}.name", f"duplicate feature name {name!r}")
        elif name and kind and window is not None:
            out[name] = Aggregation(name, function, column, window, kind)
    return tuple(out.values())


def _aggregate_type(function: str, column_type: str) -> str:
    if function in ("count", "count_distinct"):
        return ex.INT64
    if function == "last":
        return column_type
    if column_type not in ex.NUMERIC:
        return ""
    if function == "mean":
        return ex.DOUBLE
    return column_type  # sum, min, max keep the column's type


def _service(item: dict[str, Any], path: str, defs: Definitions, problems: _Problems) -> None:
    _fields(item, path, {"name", "features", "description"}, problems)
    name = _name(item, path, problems)
    description = _text(item, "description", path, problems, required=False)
    references = item.get("features")
    if not isinstance(references, list) or not references or len(references) > 1000:
        problems.add(f"{path}.features", "a list of 1 to 1000 references (view or view:feature)")
        references = []
    chosen: list[tuple[str, str]] = []
    for index, reference in enumerate(references):
        here = f"{path}.features[{index}]"
        if not isinstance(reference, str) or len(reference) > 127:
            problems.add(here, "a reference: view or view:feature")
            continue
        view_name, _, feature = reference.partition(":")
        view = defs.feature_views.get(view_name)
        if view is None:
            problems.add(here, f"unknown feature view {shorten(view_name, 40)!r}")
            continue
        names = view.feature_types()
        if feature and feature not in names:
            problems.add(here, f"view {view_name!r} has no feature {shorten(feature, 40)!r}")
            continue
        for one in [feature] if feature else list(names):
            if (view_name, one) not in chosen:
                chosen.append((view_name, one))
    if _unique("feature service", name, path, defs.feature_services, problems) and chosen:
        defs.feature_services[name] = FeatureService(name, tuple(chosen), description)
        defs.documents[("feature_service", name)] = _canonical(item)

"""The feature store behind the service: Feast, holding what the definitions
compile to, plus the applied definitions' history.

Feast is the writer of record and the definitions' home: every entity,
source, feature view and feature service is a Feast object in Feast's
registry (a file locally; a SQL registry on PostgreSQL by setting), and
online values live in Feast's online store (SQLite locally). What Feast
does not do, this module does:

- **Apply as one change.** ``apply`` compares the new definitions with the
  last applied ones (kept here, with a revision number, next to Feast's
  registry), reports each object as created, updated, unchanged or deleted,
  and for ``validate_only`` stops there. Otherwise it hands Feast every
  object and every deletion in one ``FeatureStore.apply(partial=False)``,
  which commits Feast's registry once, at its end; the definitions' new
  revision is written (atomically, by rename) only after Feast succeeded.
  A failed apply leaves the last revision in force.
- **Computed views.** Each feature view is fed by a push source over a
  parquet file of its computed rows (``mlmesh_features.batch``): Feast
  stores and serves values; the batch computation and the Flink job
  (``mlmesh_features.streaming``) make them. ``source_events`` gives a
  source's events (a batch source's parquet; a stream source's backfill
  parquet and event log), ``materialize`` computes a view from them in
  chunks (``mlmesh_features.operations``) and writes it to the online
  store; ``write`` writes computed or pushed rows.
- **Online values** are read and written in Feast's online-store layout
  by ``mlmesh_features.online``, not through Feast's Python: one pipelined
  round trip (Redis, on an asyncio client) or one query (SQLite, on reader
  threads) per view and call, off the Feast thread, and values kept
  serialized up to the response. Feast's own reader and
  ``get_online_features`` read what it writes, and the reverse.

Every Feast call runs on one thread of its own (``FeastThread``): Feast is
synchronous, and its SQLite connection and registry cache are not built for
concurrent callers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from mlmesh_features import expressions as ex
from mlmesh_features import telemetry
from mlmesh_features.batch import EVENT_TIMESTAMP
from mlmesh_features.definitions import SECTION_KINDS, Definitions, Source, parse
from mlmesh_features.online import (
    OnlineValue,
    RedisLayout,
    SqliteLayout,
    ViewLayout,
    ViewRows,
    WriteRows,
)

T = TypeVar("T")

PROJECT = "mlmesh"

# What the diff calls each kind of object (mlmesh.features.v1.ObjectType).
KINDS = tuple(SECTION_KINDS.values())


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    action: str  # created | updated | deleted | unchanged


@dataclass(frozen=True)
class Applied:
    revision: int
    changes: list[Change]


class FeastThread:
    """One thread for every Feast call."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="feast")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, True)


def _feast_type(kind: str) -> Any:
    from feast import types

    return {
        ex.INT64: types.Int64,
        ex.DOUBLE: types.Float64,
        ex.STRING: types.String,
        ex.BOOL: types.Bool,
    }[kind]


class FeatureStore:
    """The service's Feast repository in ``root`` (feature_store.yaml is
    written from the settings, never read from a caller)."""

    def __init__(
        self,
        root: Path,
        online_store: dict[str, Any] | None = None,
        registry: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.computed = root / "computed"
        self.computed.mkdir(exist_ok=True)
        self._online_store = online_store or {"type": "sqlite", "path": str(root / "online.db")}
        self._registry = registry or str(root / "registry.db")
        self._lock = threading.Lock()
        self._feast: Any = None
        self.definitions, self.revision = self._load_current()
        # Our reader and writer of Feast's online layout (mlmesh_features.online).
        self.online: RedisLayout | SqliteLayout
        if self._online_store["type"] == "redis":
            self.online = RedisLayout(
                self._online_store["connection_string"],
                self._online_store.get("key_ttl_seconds"),
                timeout_s,
            )
        else:
            path = Path(self._online_store["path"])  # relative: to the root, as Feast has it
            self.online = SqliteLayout(str(path if path.is_absolute() else root / path), timeout_s)
        self._layouts: tuple[Definitions, dict[str, ViewLayout]] = (self.definitions, {})

    # ---- Feast ------------------------------------------------------------------

    def feast(self) -> Any:
        if self._feast is None:
            from feast import FeatureStore as Feast
            from feast import RepoConfig

            registry: dict[str, Any] = {"path": self._registry, "cache_ttl_seconds": 0}
            if self._registry.startswith(("postgresql", "sqlite:")):
                registry["registry_type"] = "sql"
            config = RepoConfig(
                project=PROJECT,
                provider="local",
                registry=registry,
                online_store=self._online_store,
                offline_store={"type": "file"},
                entity_key_serialization_version=3,
                repo_path=str(self.root),
            )
            self._feast = Feast(config=config)
        return self._feast

    def _objects(self, defs: Definitions) -> dict[tuple[str, str], Any]:
        from feast import (
            Entity,
            FeatureService,
            FeatureView,
            Field,
            FileSource,
            PushSource,
            ValueType,
        )

        out: dict[tuple[str, str], Any] = {}
        entities = {}
        for entity in defs.entities.values():
            entities[entity.name] = Entity(
                name=entity.name,
                join_keys=[entity.join_key],
                value_type=ValueType.INT64 if entity.value_type == ex.INT64 else ValueType.STRING,
                description=entity.description,
            )
            out[("entity", entity.name)] = entities[entity.name]
        for source in defs.sources.values():
            out[("data_source", source.name)] = FileSource(
                name=source.name,
                path=source.path or str(self.root / "events" / f"{source.name}.parquet"),
                timestamp_field=source.timestamp_field,
                tags={"kind": source.kind},
            )
        views = {}
        for view in defs.feature_views.values():
            computed = FileSource(
                name=f"{view.name}__computed",
                path=str(self.computed / f"{view.name}.parquet"),
                timestamp_field=EVENT_TIMESTAMP,
            )
            push = PushSource(name=f"{view.name}__push", batch_source=computed)
            keys = [
                Field(
                    name=defs.entities[e].join_key, dtype=_feast_type(defs.entities[e].value_type)
                )
                for e in view.entities
            ]
            features = [
                Field(name=n, dtype=_feast_type(t)) for n, t in view.feature_types().items()
            ]
            views[view.name] = FeatureView(
                name=view.name,
                entities=[entities[e] for e in view.entities],
                ttl=view.ttl or timedelta(0),
                schema=keys + features,
                source=push,
                online=view.online,
                tags={**view.tags, "mlmesh.source": view.source},
                description=view.description,
            )
            out[("feature_view", view.name)] = views[view.name]
        for service in defs.feature_services.values():
            by_view: dict[str, list[str]] = {}
            for view_name, feature in service.features:
                by_view.setdefault(view_name, []).append(feature)
            out[("feature_service", service.name)] = FeatureService(
                name=service.name,
                features=[views[v][names] for v, names in by_view.items()],
                description=service.description,
            )
        return out

    # ---- the definitions' history ---------------------------------------------------

    def _history(self) -> Path:
        path = self.root / "definitions"
        path.mkdir(exist_ok=True)
        return path

    def _load_current(self) -> tuple[Definitions, int]:
        current = self._history() / "CURRENT"
        if not current.exists():
            return Definitions(), 0
        revision = int(current.read_text())
        record = json.loads((self._history() / f"{revision}.json").read_text())
        return parse(record["source"]), revision

    def _save(self, source: str, revision: int) -> None:
        history = self._history()
        record = {
            "revision": revision,
            "applied_at": datetime.now(UTC).isoformat(),
            "source": source,
        }
        for name, data in ((f"{revision}.json", json.dumps(record)), ("CURRENT", str(revision))):
            partial = history / f".{name}.tmp"
            partial.write_text(data)
            os.replace(partial, history / name)

    # ---- apply ------------------------------------------------------------------------

    def diff(self, defs: Definitions, prune: bool) -> list[Change]:
        old = self.definitions.documents
        changes = []
        for kind in KINDS:
            for (k, name), document in defs.documents.items():
                if k != kind:
                    continue
                if (kind, name) not in old:
                    action = "created"
                elif old[(kind, name)] != document:
                    action = "updated"
                else:
                    action = "unchanged"
                changes.append(Change(kind, name, action))
            if prune:
                changes.extend(
                    Change(kind, name, "deleted")
                    for (k, name) in old
                    if k == kind and (kind, name) not in defs.documents
                )
        return changes

    def apply(self, source: str, defs: Definitions, *, prune: bool, validate_only: bool) -> Applied:
        """Applies ``defs`` (parsed from ``source``) as one change; see the
        module docstring. Runs on the Feast thread."""
        with self._lock:
            changes = self.diff(defs, prune)
            if validate_only or all(c.action == "unchanged" for c in changes):
                return Applied(self.revision, changes)
            deleted = []
            if prune:
                previous = self._objects(self.definitions)
                deleted = [previous[(c.kind, c.name)] for c in changes if c.action == "deleted"]
            else:
                # Without prune, what the source no longer declares stays in
                # force; the whole is checked again (an old service may name a
                # feature the new source dropped).
                source = _source_in_force(self.definitions, defs, source)
                defs = parse(source)
            objects = self._objects(defs)
            self.feast().apply(list(objects.values()), objects_to_delete=deleted, partial=False)
            revision = self.revision + 1
            self._save(source, revision)
            self.definitions, self.revision = defs, revision
            return Applied(revision, changes)

    # ---- writing and reading values -----------------------------------------------------

    def materialize(
        self,
        view_name: str,
        start: datetime | None = None,
        end: datetime | None = None,
        chunk_events: int = 50_000,
    ) -> int:
        """Computes ``view_name`` from its source's events and writes the rows
        with event times in [start, end] (start: the earliest event; end: now)
        to the online store, in chunks of about ``chunk_events`` events
        (``operations.materialize_view``; the service runs the same chunks as
        a resumable operation); the count of rows computed in that range. A
        window end after ``end`` is not a value yet: its window is still open."""
        from mlmesh_features.operations import materialize_view

        return materialize_view(self, view_name, start, end or datetime.now(UTC), chunk_events)

    def source_events(self, source: Source) -> pd.DataFrame:
        """Every event of ``source`` for the batch path: its columns and its
        timestamp field. A batch source is its parquet file; a stream source
        is its event log (``streaming.eventlog``), after its backfill parquet
        when it declares a ``path``."""
        if source.kind != "stream":
            return pd.read_parquet(source.path)
        from mlmesh_features.streaming.eventlog import SEQ, read_events

        logged = read_events(self.root, source).drop(columns=[SEQ])
        if not source.path:
            return logged
        backfill = pd.read_parquet(source.path, columns=list(logged.columns))
        if logged.empty:
            return backfill
        backfill = backfill.astype(logged.dtypes.drop(source.timestamp_field).to_dict())
        backfill[source.timestamp_field] = pd.to_datetime(
            backfill[source.timestamp_field], utc=True
        )
        return pd.concat([backfill, logged], ignore_index=True)

    def layout(self, view_name: str) -> ViewLayout:
        """Where ``view_name``'s values live, for the definitions in force
        (kept per definitions: an apply makes new ones)."""
        defs = self.definitions
        cached_for, layouts = self._layouts
        if cached_for is not defs:
            layouts = {}
            self._layouts = (defs, layouts)
        layout = layouts.get(view_name)
        if layout is None:
            view = defs.feature_views[view_name]
            layout = layouts[view_name] = ViewLayout(
                PROJECT,
                view_name,
                defs.join_keys(view),
                [defs.entities[e].value_type for e in view.entities],
                view.feature_types(),
                view.ttl,
            )
        return layout

    def write(self, view_name: str, rows: pd.DataFrame) -> None:
        """Writes computed rows (join keys, event_timestamp, features) to the
        online store in Feast's layout: the latest row of each entity in
        ``rows`` (on Redis, only where it is newer than the stored row, as
        Feast's writer does). Runs on the store's thread."""
        if rows.empty:
            return
        layout = self.layout(view_name)
        keys = list(layout.join_keys)
        latest = rows.sort_values(EVENT_TIMESTAMP, kind="stable").drop_duplicates(keys, keep="last")
        encoded = WriteRows.from_frame(layout, latest, EVENT_TIMESTAMP, self.online.needs_text)
        self.online.write(layout, encoded)
        view = self.definitions.feature_views[view_name]
        source = self.definitions.sources.get(view.source)
        newest = pd.Timestamp(latest[EVENT_TIMESTAMP].max())
        if pd.notna(newest):
            step = view.step.total_seconds() if view.step else 0.0
            telemetry.written(view_name, source.kind if source else "", newest.timestamp(), step)

    def read(
        self, view_name: str, features: Sequence[str], entity_rows: Sequence[dict[str, Any]]
    ) -> list[list[OnlineValue]]:
        """The online values of ``features`` of ``view_name`` for each entity
        row (a dict of join key to value), in order. Blocking: for the
        store's thread and for tests; the service reads with ``read_rows``."""
        layout = self.layout(view_name)
        entities = [tuple(row[k] for k in layout.join_keys) for row in entity_rows]
        return self.online.read(layout, list(features), entities).online_values()

    async def read_rows(
        self, view_name: str, features: Sequence[str], entities: Sequence[Sequence[Any]]
    ) -> ViewRows:
        """``features`` of ``view_name`` for each entity (its join key values
        in the view's join key order), still serialized: one round trip to
        the online store, off the Feast thread (Redis: the asyncio client;
        SQLite: a reader thread)."""
        return await self.online.aread(self.layout(view_name), list(features), entities)

    async def close(self) -> None:
        """Closes the online store's clients and the SQL registry's pools."""
        await self.online.close()
        if self._feast is not None:
            registry = self._feast.registry
            engines = {getattr(registry, n, None) for n in ("write_engine", "read_engine")}
            for engine in engines:
                if engine is not None:
                    await asyncio.to_thread(engine.dispose)


def _source_in_force(old: Definitions, new: Definitions, source: str) -> str:
    """The YAML of ``new`` (parsed from ``source``) plus what ``old``
    declares that ``new`` does not: ``source`` itself when that is nothing."""
    documents = {**old.documents, **new.documents}
    if documents.keys() == new.documents.keys():
        return source
    import yaml

    section_of = {kind: section for section, kind in SECTION_KINDS.items()}
    sections: dict[str, list[Any]] = {section: [] for section in SECTION_KINDS}
    for (kind, _), document in documents.items():
        sections[section_of[kind]].append(document)
    return yaml.safe_dump(sections, sort_keys=False)

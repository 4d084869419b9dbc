"""The loader: the Flink job's committed output, into the online store.

For every streamed view (windowed, over a stream source) it tails
``<root>/stream_out/<view>/``: the part files Flink committed on a
checkpoint (names not starting with '.' or '_', in any bucket folder;
in-progress files are hidden, and a committed file never changes). Each new
file's rows (join keys, ``window_end_ms``, the aggregations) are reduced to
each entity's newest window end, and written through ``FeatureStore.write``
with ``event_timestamp`` = that end, unless an end at least as new was
already loaded for the entity: a file read late (or again, after a restart,
when every file is read once more) never moves a value back.

Reading files runs on a worker thread and writing on the store's Feast
thread; the event loop only sleeps between polls (100 ms by default, so a
window is served well within a second of its file's commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from mlmesh_features.batch import EVENT_TIMESTAMP, PANDAS_TYPES
from mlmesh_features.definitions import Definitions, FeatureView
from mlmesh_features.store import FeastThread, FeatureStore

log = logging.getLogger("mlmesh.features.loader")

WINDOW_END = "window_end_ms"
POLL_INTERVAL_S = 0.1
# Rows read per view per poll: a backlog (a restart re-reading every file)
# loads in bounded steps.
MAX_FILES_PER_POLL = 256


def output_directory(root: Path, view_name: str) -> Path:
    return root / "stream_out" / view_name


def streamed_views(defs: Definitions) -> list[FeatureView]:
    """The views the Flink job computes: windowed, over a stream source."""
    return [
        view
        for view in defs.feature_views.values()
        if view.windowed and defs.sources[view.source].kind == "stream" and view.online
    ]


def committed_files(directory: Path) -> Iterator[Path]:
    """Committed part files under ``directory`` (bucket folders included),
    skipping hidden ('.') and underscore names at every level."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.startswith((".", "_")):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from committed_files(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                yield Path(entry.path)


class StreamLoader:
    """Tails the streamed views' output into the online store."""

    def __init__(
        self, store: FeatureStore, feast: FeastThread, interval_s: float = POLL_INTERVAL_S
    ) -> None:
        self.store = store
        self.feast = feast
        self.interval_s = interval_s
        self._seen: dict[str, set[str]] = {}  # view -> files read
        self._loaded: dict[str, dict[tuple[Any, ...], int]] = {}  # view -> entity -> end
        self._revision = -1

    async def run(self) -> None:
        """Polls until cancelled; a failed poll (a store down) is retried."""
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("loading streamed features failed; retrying")
                await asyncio.sleep(1.0)
            await asyncio.sleep(self.interval_s)

    async def poll(self) -> int:
        """Loads what was committed since the last poll; the rows written."""
        defs = self.store.definitions
        if self.store.revision != self._revision:
            # A new revision may change a view's features: read all again.
            self._seen.clear()
            self._loaded.clear()
            self._revision = self.store.revision
        written = 0
        for view in streamed_views(defs):
            seen = self._seen.setdefault(view.name, set())
            loaded = self._loaded.setdefault(view.name, {})
            rows, files = await asyncio.to_thread(self._read_new, defs, view, seen, loaded.copy())
            if not rows.empty:
                await self.feast.run(self.store.write, view.name, rows)
                keys = defs.join_keys(view)
                ends = rows[EVENT_TIMESTAMP].astype("int64") // 1_000_000
                for key, end in zip(
                    rows[keys].itertuples(index=False, name=None), ends, strict=True
                ):
                    loaded[key] = int(end)
                written += len(rows)
            seen.update(files)
        return written

    def _read_new(
        self,
        defs: Definitions,
        view: FeatureView,
        seen: set[str],
        loaded: dict[tuple[Any, ...], int],
    ) -> tuple[pd.DataFrame, list[str]]:
        """The newest row of each entity in files not read yet, newer than
        what is loaded; and those files' names."""
        files = sorted(
            str(p) for p in committed_files(output_directory(self.store.root, view.name))
        )
        fresh = [f for f in files if f not in seen][:MAX_FILES_PER_POLL]
        keys = defs.join_keys(view)
        newest: dict[tuple[Any, ...], dict[str, Any]] = {}
        for path in fresh:
            for record in _records(Path(path)):
                key = tuple(record[k] for k in keys)
                end = record[WINDOW_END]
                if end <= loaded.get(key, -1):
                    continue
                if key not in newest or end > newest[key][WINDOW_END]:
                    newest[key] = record
        return _frame(defs, view, list(newest.values())), fresh


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _frame(defs: Definitions, view: FeatureView, records: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as ``FeatureStore.write`` takes them: join keys,
    ``event_timestamp`` (the window end) and the features, typed."""
    keys = defs.join_keys(view)
    kinds = {defs.entities[e].join_key: defs.entities[e].value_type for e in view.entities}
    types = view.feature_types()
    frame = pd.DataFrame.from_records(records, columns=[*keys, WINDOW_END, *types])
    out = pd.DataFrame({key: frame[key].astype(PANDAS_TYPES[kinds[key]]) for key in keys})
    out[EVENT_TIMESTAMP] = pd.to_datetime(frame[WINDOW_END].astype("int64"), unit="ms", utc=True)
    for name, kind in types.items():
        out[name] = frame[name].astype(PANDAS_TYPES[kind])
    return out

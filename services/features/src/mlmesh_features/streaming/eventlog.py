"""The event log: a directory of JSON-lines files per stream source, which
IngestEvents appends to, Flink's continuous file source tails, and the batch
path reads (see docs: the streaming interface).

Layout: ``<root>/eventlog/<source>/<first_seq:020d>-<count>.jsonl``, one
file per append, each line one event: the source's columns by name,
``_event_time_ms`` (epoch milliseconds) and ``_seq`` (the server's number for
it: +1 per event, per source, never reused). A file is written as the
hidden ``.<name>.tmp``, fsynced, and renamed to its name: a reader (Flink
reads a file once, when it first sees its name) never sees half a file, and
a crash mid-write leaves only a hidden file, removed on the next append.

Sequences: the next one is the highest file's ``first_seq + count``, read
from the directory under an exclusive lock (``fcntl.flock`` on
``.lock``), so threads and processes (the service, the demo streamer)
appending to one source never share a number.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from mlmesh_features import expressions as ex
from mlmesh_features.batch import PANDAS_TYPES
from mlmesh_features.definitions import Source

EVENT_TIME_MS = "_event_time_ms"
SEQ = "_seq"
# Events per append: IngestEvents' own limit (the contract's max_items).
MAX_EVENTS_PER_APPEND = 10_000
FILE_NAME = re.compile(r"([0-9]{20})-([1-9][0-9]{0,5})\.jsonl")
_INT64 = (-(2**63), 2**63 - 1)


def source_directory(root: Path, source_name: str) -> Path:
    """Where ``source_name``'s events live under the features root."""
    return root / "eventlog" / source_name


def to_millis(when: datetime) -> int:
    """Epoch milliseconds of an aware datetime, truncated (both paths see
    the same millisecond)."""
    if when.tzinfo is None:
        raise ValueError("event times must carry a time zone")
    delta = when.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def log_files(directory: Path) -> list[tuple[int, int, Path]]:
    """The named (complete) files of a source's log: (first_seq, count,
    path), in sequence order. Hidden and foreign names are skipped."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            match = FILE_NAME.fullmatch(entry.name)
            if match is not None:
                found.append((int(match.group(1)), int(match.group(2)), Path(entry.path)))
    return sorted(found)


class EventLog:
    """Appends events of stream sources under ``root`` (the features root)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def directory(self, source_name: str) -> Path:
        return source_directory(self.root, source_name)

    def append(self, source: Source, events: Sequence[dict[str, Any]]) -> tuple[int, int]:
        """Appends ``events`` (each: every column of ``source`` by name, and
        its ``timestamp_field`` as an aware datetime) as one file; returns
        (first sequence number, count). All or nothing: ValueError for an
        event that does not fit the source, before anything is written."""
        if source.kind != "stream":
            raise ValueError(f"source {source.name!r} is not a stream")
        if not 1 <= len(events) <= MAX_EVENTS_PER_APPEND:
            raise ValueError(f"1 to {MAX_EVENTS_PER_APPEND} events per append")
        lines = [_line(source, event) for event in events]
        directory = self.directory(source.name)
        directory.mkdir(parents=True, exist_ok=True)
        with self._source_lock(source.name), _flock(directory / ".lock"):
            files = log_files(directory)
            first = files[-1][0] + files[-1][1] if files else 0
            _remove_partials(directory)
            name = f"{first:020d}-{len(lines)}.jsonl"
            body = "".join(
                f'{line},"{SEQ}":{first + index}}}\n' for index, line in enumerate(lines)
            )
            partial = directory / f".{name}.tmp"
            with open(partial, "w", encoding="utf-8") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, directory / name)
            _fsync_directory(directory)
        return first, len(lines)

    def _source_lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())


def _line(source: Source, event: dict[str, Any]) -> str:
    """One event as a JSON object without its closing brace: the sequence
    number is added under the lock."""
    expected = set(source.columns) | {source.timestamp_field}
    if event.keys() != expected:
        odd = sorted(event.keys() ^ expected)
        raise ValueError(f"event columns differ from source {source.name!r}'s: {odd[:3]}")
    record: dict[str, Any] = {}
    for column, kind in source.columns.items():
        record[column] = _checked(column, kind, event[column])
    record[EVENT_TIME_MS] = to_millis(event[source.timestamp_field])
    return json.dumps(record, allow_nan=False, ensure_ascii=False)[:-1]


def _checked(column: str, kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == ex.INT64 and isinstance(value, int) and not isinstance(value, bool):
        if _INT64[0] <= value <= _INT64[1]:
            return value
    elif kind == ex.DOUBLE and isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    elif (kind == ex.STRING and isinstance(value, str)) or (
        kind == ex.BOOL and isinstance(value, bool)
    ):
        return value
    raise ValueError(f"column {column!r} is {kind}, not {type(value).__name__}")


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_partials(directory: Path) -> None:
    """Hidden half-written files a crash left (only under the lock: no
    append is writing one now)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.startswith(".") and entry.name.endswith(".jsonl.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_events(root: Path, source: Source) -> pd.DataFrame:
    """Every event in ``source``'s log: its columns (typed as the batch
    path types them), its ``timestamp_field`` (UTC), and ``_seq``; in
    sequence order."""
    records: list[dict[str, Any]] = []
    for _, _, path in log_files(source_directory(root, source.name)):
        with open(path, encoding="utf-8") as handle:
            records.extend(json.loads(line) for line in handle if line.strip())
    columns = list(source.columns)
    frame = pd.DataFrame.from_records(records, columns=[*columns, EVENT_TIME_MS, SEQ])
    out = pd.DataFrame(
        {
            column: frame[column].astype(PANDAS_TYPES[kind])
            for column, kind in source.columns.items()
        }
    )
    out[source.timestamp_field] = pd.to_datetime(
        frame[EVENT_TIME_MS].astype("int64"), unit="ms", utc=True
    )
    out[SEQ] = frame[SEQ].astype("int64")
    return out.sort_values(SEQ, kind="stable").reset_index(drop=True)

"""Read replicas of the embedded engine: a change log the primary writes and
the replicas follow, and base snapshots they start from.

Qdrant's embedded engine lets one process open a shard (its WAL is locked),
and it holds the GIL while it searches, so one process searches on one core.
To search on more cores, read replicas run as separate processes, each with
its own copy of every collection:

- The primary numbers every acknowledged write (``write_sequence``) and,
  once the engine has applied it, appends it to the change log:
  ``<root>/replication/<epoch>/changes/<seq>.npz``, one file per write,
  written under a temporary name and renamed into place (a reader never sees
  half a record). Numbers are contiguous: a number is taken only when the
  write succeeded.
- A *base* is a snapshot of one collection taken at a sequence number
  (``bases/<collection>/<seq>.tar``), with its HNSW index. The primary takes
  one of every collection when it starts (a new *epoch*), and again when a
  collection has been quiet for a while after writes, so replicas pick up
  the index the primary built instead of building their own.
- A replica installs the newest base of every collection, then applies every
  record after it, polling the log every ``follow_interval_seconds``. When a
  newer base appears it installs it and re-applies the records after it
  (records are idempotent: upserts and deletes by id). A new epoch (the
  primary restarted), or a gap in the numbers (records it needed were
  pruned), makes it start again from the bases.

Staleness: a write is visible on a replica about one poll interval after
the primary acknowledged it, plus the time to apply it. A read that carries
``min_write_sequence`` waits until its replica has applied that write.

With the cluster engine (a Qdrant server or cluster) none of this runs:
every instance reads and writes the cluster, which replicates itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlmesh_vectors.engine.base import (
    Batch,
    CollectionExists,
    CollectionNotFound,
    spec_from_json,
)

log = logging.getLogger("mlmesh.vectors.replication")

CURRENT = "current"  # names the live epoch
# A collection quiet this long after writes gets a new base (so replicas
# take the primary's index), at most once per BASE_EVERY_S.
QUIET_S = 2.0
BASE_EVERY_S = 10.0
# Change files are kept this long after every collection's newest base
# covers them (a replica further behind starts again from the bases).
KEEP_CHANGES_S = 300.0


@dataclass
class Change:
    """One write, as the change log stores it."""

    seq: int
    op: str  # create | delete_collection | upsert | delete_ids | install
    collection: str
    spec: dict[str, Any] | None = None
    ids: list[str] | None = None
    payloads: list[dict[str, Any]] | None = None
    vectors: np.ndarray | None = None
    path: str | None = None  # install: the snapshot file

    def dump(self) -> bytes:
        meta = {k: v for k, v in asdict(self).items() if k != "vectors"}
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        if self.vectors is not None:
            arrays["vectors"] = self.vectors
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def load(cls, path: Path) -> Change:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            vectors = data["vectors"] if "vectors" in data.files else None
        return cls(**meta, vectors=vectors)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _seq_of(path: Path) -> int:
    return int(path.stem)


def _name(seq: int) -> str:
    return f"{seq:016d}"


class ChangeLog:
    """The primary's side: numbers writes, logs them, takes bases."""

    def __init__(self, root: Path, backend: Any) -> None:
        self.root = root
        self.backend = backend
        self.root.mkdir(parents=True, exist_ok=True)
        previous = self._current_epoch()
        self.last_seq = self._last_seq(previous) if previous else 0
        self.epoch = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.dir = self.root / self.epoch
        (self.dir / "changes").mkdir(parents=True)
        (self.dir / "bases").mkdir()
        # Per collection: the seq of its newest base, when it was taken, the
        # seq and time of its last write, and its indexed count at the base.
        self._base_seq: dict[str, int] = {}
        self._base_time: dict[str, float] = {}
        self._last_write: dict[str, tuple[int, float]] = {}
        self._base_indexed: dict[str, int] = {}
        self.lock = threading.Lock()  # one write (number, apply, log) at a time

    def _current_epoch(self) -> str | None:
        with contextlib.suppress(FileNotFoundError):
            return (self.root / CURRENT).read_text().strip() or None
        return None

    def _last_seq(self, epoch: str) -> int:
        changes = self.root / epoch / "changes"
        seqs = [_seq_of(p) for p in changes.glob("*.npz")] if changes.is_dir() else []
        meta = self.root / epoch / "epoch.json"
        start = json.loads(meta.read_text())["start_seq"] if meta.is_file() else 0
        return max([start, *seqs])

    def start(self) -> None:
        """Takes a base of every collection at the current number, then makes
        this epoch current (replicas switch to it), and drops older epochs."""
        for spec in self.backend.list_collections():
            self._take_base(spec.name)
        _write_atomic(self.dir / "epoch.json", json.dumps({"start_seq": self.last_seq}).encode())
        _write_atomic(self.root / CURRENT, self.epoch.encode())
        for old in self.root.iterdir():
            if old.is_dir() and old.name != self.epoch:
                shutil.rmtree(old, ignore_errors=True)
        log.info("change log epoch %s from seq %d", self.epoch, self.last_seq)

    def write(self, collection: str, apply: Callable[[], Change]) -> tuple[int, Any]:
        """Runs ``apply`` (the engine write; it returns the record to log)
        under the write lock; logs it with the next number. Returns the
        number and the record."""
        with self.lock:
            change = apply()
            self.last_seq += 1
            change.seq = self.last_seq
            _write_atomic(self.dir / "changes" / f"{_name(change.seq)}.npz", change.dump())
            if change.op == "delete_collection":
                shutil.rmtree(self.dir / "bases" / collection, ignore_errors=True)
                self._base_seq.pop(collection, None)
                self._last_write.pop(collection, None)
            else:
                self._last_write[collection] = (change.seq, time.monotonic())
            return change.seq, change

    def _take_base(self, collection: str) -> None:
        """A base of ``collection`` at the current number (write lock held,
        or before the epoch is live)."""
        snapshot = self.backend.create_snapshot(collection)
        folder = self.dir / "bases" / collection
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(
            self.backend.snapshot_path(collection, snapshot.name),
            folder / f"{_name(self.last_seq)}.tar",
        )
        for old in sorted(folder.glob("*.tar"))[:-2]:  # keep two: one may be being read
            old.unlink(missing_ok=True)
        self._base_seq[collection] = self.last_seq
        self._base_time[collection] = time.monotonic()
        with contextlib.suppress(CollectionNotFound):
            self._base_indexed[collection] = self.backend.get_collection(
                collection
            ).indexed_point_count

    def maintain(self) -> None:
        """Takes new bases of quiet collections written since their last, and
        prunes change files every base covers (called every second or so)."""
        now = time.monotonic()
        for collection, (seq, when) in list(self._last_write.items()):
            if now - when < QUIET_S or now - self._base_time.get(collection, 0.0) < BASE_EVERY_S:
                continue
            try:
                state = self.backend.get_collection(collection)
            except CollectionNotFound:
                self._last_write.pop(collection, None)
                continue
            # Written since the last base, or indexed further (the index
            # is what replicas take bases for); never mid-build.
            grown = state.indexed_point_count != self._base_indexed.get(collection)
            if state.indexing or not (seq > self._base_seq.get(collection, 0) or grown):
                continue
            with self.lock:
                try:
                    self._take_base(collection)
                except CollectionNotFound:
                    self._last_write.pop(collection, None)
        # Records up to ``covered`` are in every written collection's newest base.
        covered = min((self._base_seq.get(c, 0) for c in self._last_write), default=0)
        cutoff = time.time() - KEEP_CHANGES_S
        for path in (self.dir / "changes").glob("*.npz"):
            with contextlib.suppress(FileNotFoundError, ValueError):
                if _seq_of(path) <= covered and path.stat().st_mtime < cutoff:
                    path.unlink()


class Follower:
    """A replica's side: keeps its own backend equal to the primary's, as of
    ``applied`` (the last write number it has applied)."""

    def __init__(self, root: Path, backend: Any) -> None:
        self.root = root
        self.backend = backend
        self.epoch: str | None = None
        self.applied = 0
        self._base_seq: dict[str, int] = {}
        self.applied_changed = threading.Condition()

    def _set_applied(self, seq: int) -> None:
        with self.applied_changed:
            self.applied = seq
            self.applied_changed.notify_all()

    def step(self) -> bool:
        """Catches up once; True if anything changed."""
        with contextlib.suppress(FileNotFoundError):
            epoch = (self.root / CURRENT).read_text().strip()
            if epoch != self.epoch:
                self._bootstrap(epoch)
                return True
            return self._follow()
        return False

    def _epoch_dir(self) -> Path:
        assert self.epoch is not None
        return self.root / self.epoch

    def _bootstrap(self, epoch: str) -> None:
        start = json.loads((self.root / epoch / "epoch.json").read_text())["start_seq"]
        for spec in self.backend.list_collections():
            self.backend.delete_collection(spec.name)
        self._base_seq = {}
        self.epoch = epoch
        for folder in sorted((self.root / epoch / "bases").iterdir()):
            self._install_newest(folder.name)
        # Records up to the epoch's start, and any pruned since, are in the
        # bases (the primary prunes only what every base covers).
        first = min(
            (_seq_of(p) for p in (self.root / epoch / "changes").glob("*.npz")), default=None
        )
        newest_base = max(self._base_seq.values(), default=start)
        self._set_applied(max(start, newest_base if first is None else first - 1))
        log.info("following epoch %s from seq %d", epoch, start)

    def _install_newest(self, collection: str) -> int:
        bases = sorted((self._epoch_dir() / "bases" / collection).glob("*.tar"))
        if not bases:
            return self._base_seq.get(collection, 0)
        seq = _seq_of(bases[-1])
        if seq > self._base_seq.get(collection, -1):
            self.backend.install_snapshot_file(bases[-1], collection)
            self._base_seq[collection] = seq
        return seq

    def _follow(self) -> bool:
        changes = self._epoch_dir() / "changes"
        changed = False
        # A newer base: install it, then re-apply what came after it.
        for folder in (self._epoch_dir() / "bases").iterdir():
            name = folder.name
            newest = max((_seq_of(p) for p in folder.glob("*.tar")), default=0)
            if newest > self._base_seq.get(name, 0) and newest <= self.applied:
                self._install_newest(name)
                for seq in range(newest + 1, self.applied + 1):
                    change = self._read(changes, seq)
                    if change is None:
                        raise _Gap(seq)
                    if change.collection == name:
                        self._apply(change)
                changed = True
        while True:
            change = self._read(changes, self.applied + 1)
            if change is None:
                if any(_seq_of(p) > self.applied + 1 for p in changes.glob("*.npz")):
                    raise _Gap(self.applied + 1)
                return changed
            if change.seq > self._base_seq.get(change.collection, 0):
                self._apply(change)
            self._set_applied(change.seq)
            changed = True

    @staticmethod
    def _read(changes: Path, seq: int) -> Change | None:
        try:
            return Change.load(changes / f"{_name(seq)}.npz")
        except FileNotFoundError:
            return None

    def _apply(self, change: Change) -> None:
        backend = self.backend
        if change.op == "create":
            assert change.spec is not None
            with contextlib.suppress(CollectionExists):
                backend.create_collection(spec_from_json(change.spec))
        elif change.op == "delete_collection":
            backend.delete_collection(change.collection)
            self._base_seq.pop(change.collection, None)
        elif change.op == "upsert":
            assert change.ids is not None and change.vectors is not None
            backend.upsert(
                change.collection, Batch(change.ids, change.vectors, change.payloads or [])
            )
        elif change.op == "delete_ids":
            assert change.ids is not None
            backend.delete_ids(change.collection, change.ids)
        elif change.op == "install":
            assert change.path is not None
            backend.install_snapshot_file(Path(change.path), change.collection)
        else:
            raise ValueError(f"unknown change {change.op}")

    def run_forever(self, interval_s: float, stop: threading.Event) -> None:
        """Follows until ``stop`` is set (on its own thread)."""
        while not stop.is_set():
            try:
                changed = self.step()
            except _Gap as gap:
                log.warning("change %d was pruned; starting again from the bases", gap.seq)
                self.epoch = None
                changed = True
            except Exception:
                log.exception("following the primary failed; retrying")
                self.epoch = None
                changed = False
                stop.wait(1.0)
            if not changed:
                stop.wait(interval_s)

    def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """Blocks until ``seq`` is applied, or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        with self.applied_changed:
            while self.applied < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.applied_changed.wait(left)
        return True


class _Gap(Exception):
    def __init__(self, seq: int) -> None:
        super().__init__(f"change {seq} is missing")
        self.seq = seq

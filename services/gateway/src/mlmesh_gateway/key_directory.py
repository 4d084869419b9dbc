"""The keys as a change stream: the gateway's side of every service's key view.

``KeyDirectory`` holds every key as services verify it (``DirectoryKey``)
and the revision it is current to. It reads what changed from the store
right after each of this replica's own writes and every ``poll_seconds``
(other replicas' writes), applies it to this process's ``KeyView`` and
fans it out to every ``WatchKeys`` stream. A stream starts with a full
snapshot, so a service that reconnects also applies what changed while it
was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from mlmesh.gateway.v1 import key_directory_service_pb2 as kd
from mlmesh.gateway.v1 import key_directory_service_pb2_grpc
from mlmesh_chassis.auth import KeyView

from mlmesh_gateway.keys import KeyStore

log = logging.getLogger("mlmesh.gateway.keys")
SNAPSHOT_PAGE = 500
HEARTBEAT_SECONDS = 5.0
# Changes a slow watcher may fall behind by before its stream is ended (it
# reconnects and reads a fresh snapshot).
WATCHER_BACKLOG = 1000
# Unknown keys make the gateway read its store at most this often.
CATCH_UP_S = 0.05


class KeyDirectory:
    def __init__(self, store: KeyStore, view: KeyView, poll_seconds: float = 0.25) -> None:
        self.store = store
        self.view = view
        self.poll_seconds = poll_seconds
        self.revision = 0
        self._entries: dict[str, kd.DirectoryKey] = {}
        self._watchers: set[asyncio.Queue[kd.WatchKeysResponse | None]] = set()
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._caught_up = 0.0
        self._catching_up: asyncio.Task[None] | None = None

    async def catch_up(self, key_id: str = "") -> None:
        """Reads the store now, for a key another replica created a moment
        ago (every change since the view's revision, whichever ``key_id``).
        Callers arriving together share one read; unknown keys make at most
        one read per CATCH_UP_S however many arrive."""
        if self._catching_up is None or self._catching_up.done():
            if time.monotonic() - self._caught_up < CATCH_UP_S:
                return
            self._caught_up = time.monotonic()
            self._catching_up = asyncio.get_running_loop().create_task(self.refresh())
        with contextlib.suppress(Exception):  # the database is down: the view held
            await asyncio.shield(self._catching_up)

    async def start(self) -> None:
        self.view.catch_up = self.catch_up
        entries, self.revision = await self.store.changes_since(0)
        self._entries = {e.key.id: e for e in entries}
        self.view.replace(entries, self.revision)
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for queue in list(self._watchers):
            self._push(queue, None)

    async def refresh(self) -> None:
        """Reads and publishes what changed since the revision held."""
        async with self._lock:
            entries, revision = await self.store.changes_since(self.revision)
            if not entries:
                return
            self.view.apply(entries, revision)
            for entry in entries:
                self._entries[entry.key.id] = entry
            self.revision = revision
            change = kd.WatchKeysResponse(keys=entries, revision=revision)
            for queue in list(self._watchers):
                self._push(queue, change)

    def _push(self, queue: asyncio.Queue[kd.WatchKeysResponse | None], item: object) -> None:
        try:
            queue.put_nowait(item)  # type: ignore[arg-type]
        except asyncio.QueueFull:
            # Too far behind: end its stream; it reconnects and resyncs.
            self._watchers.discard(queue)
            queue.get_nowait()
            queue.put_nowait(None)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.refresh()
            except Exception as error:  # the database is down: keep the view held
                log.warning("key directory refresh failed: %s", type(error).__name__)

    async def watch(self) -> AsyncIterator[kd.WatchKeysResponse]:
        """A full snapshot, then every change, with heartbeats."""
        queue: asyncio.Queue[kd.WatchKeysResponse | None] = asyncio.Queue(WATCHER_BACKLOG)
        async with self._lock:
            self._watchers.add(queue)
            entries, revision = list(self._entries.values()), self.revision
        try:
            for start in range(0, max(len(entries), 1), SNAPSHOT_PAGE):
                last = start + SNAPSHOT_PAGE >= len(entries)
                yield kd.WatchKeysResponse(
                    snapshot=True,
                    snapshot_complete=last,
                    keys=entries[start : start + SNAPSHOT_PAGE],
                    revision=revision,
                )
            while True:
                try:
                    change = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    yield kd.WatchKeysResponse(revision=self.revision)
                    continue
                if change is None:
                    return
                if change.revision > revision:
                    yield change
        finally:
            self._watchers.discard(queue)


class KeyDirectoryServicer(key_directory_service_pb2_grpc.KeyDirectoryServiceServicer):
    def __init__(self, directory: KeyDirectory) -> None:
        self.directory = directory

    async def WatchKeys(self, request, context):  # type: ignore[no-untyped-def]
        async for message in self.directory.watch():
            yield message

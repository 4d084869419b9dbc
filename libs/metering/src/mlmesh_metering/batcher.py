"""Usage events batched off the request path, written by a sink.

``UsageBatcher.record`` only queues; a background task writes what is queued
every ``flush_s`` or as soon as ``batch`` events wait. Writes are idempotent
by event id, so writing a batch again (after a failure that may or may not
have committed it) records each event once.

Two kinds of failure, two policies:

- an outage (the sink raises ``Unavailable``: the database or the gateway is
  unreachable): nothing is dropped; the batch is retried with backoff
  (doubling from ``backoff_s`` up to ``max_backoff_s``);
- a data error (anything else: a value the ledger refuses): the batch is
  retried one event at a time, so one bad event never holds the others
  back; an event that fails on its own is dropped with an error log and the
  ``mlmesh_usage_events_dropped`` metric, never retried forever.

Flush lag (``mlmesh_usage_flush_lag_seconds``, read at scrape time, nothing
per event): how long the oldest event still queued has waited, 0 when none
waits. An upper bound: after a flush, what is left was queued since that
flush began, so its start stands for the oldest left.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import logging
import time
import weakref
from collections.abc import Iterator

from mlmesh_chassis.errors import Unavailable
from mlmesh_chassis.metrics import REGISTRY
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mlmesh_metering.events import UsageEvent

log = logging.getLogger("mlmesh.metering")

DROPPED = Counter(
    "mlmesh_usage_events_dropped",
    "Usage events the ledger refused on their own (a data error); never retried.",
    ["sink"],
    registry=REGISTRY,
)
WRITTEN = Counter(
    "mlmesh_usage_events_written",
    "Usage events handed to the ledger (including ones it already had).",
    ["sink"],
    registry=REGISTRY,
)


class _QueueCollector(Collector):
    """Per sink: events waiting and the flush lag, over the live batchers."""

    def __init__(self) -> None:
        self.batchers: weakref.WeakSet[UsageBatcher] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending = GaugeMetricFamily(
            "mlmesh_usage_events_pending", "Usage events queued, not written yet.", labels=["sink"]
        )
        lag = GaugeMetricFamily(
            "mlmesh_usage_flush_lag_seconds",
            "How long the oldest usage event not yet written has waited (0: none waits).",
            labels=["sink"],
        )
        now = time.monotonic()
        counts: dict[str, int] = {}
        lags: dict[str, float] = {}
        for batcher in list(self.batchers):
            counts[batcher.name] = counts.get(batcher.name, 0) + batcher.pending
            lags[batcher.name] = max(lags.get(batcher.name, 0.0), batcher.lag_seconds(now))
        for name, count in sorted(counts.items()):
            pending.add_metric([name], count)
            lag.add_metric([name], lags[name])
        yield pending
        yield lag


_QUEUES = _QueueCollector()
REGISTRY.register(_QUEUES)


class UsageBatcher(abc.ABC):
    """Queues usage events and writes them in batches through ``_write``."""

    name = "batcher"

    def __init__(
        self,
        flush_s: float = 0.1,
        batch: int = 500,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.flush_s = flush_s
        self.batch = batch
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._pending: list[UsageEvent] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        # time.monotonic() since which the oldest queued event has waited
        # (None: nothing queued).
        self._waiting_since: float | None = None
        _QUEUES.batchers.add(self)

    @abc.abstractmethod
    async def _write(self, events: list[UsageEvent]) -> None:
        """Writes ``events`` (idempotent by event id). Raises Unavailable for
        an outage; anything else means the data was refused."""

    async def record(self, event: UsageEvent) -> None:
        """Queues one event (returns at once; written within ``flush_s``)."""
        if not self._pending:
            self._waiting_since = time.monotonic()
        self._pending.append(event)
        self._recorded(event)
        if self._flusher is None or self._flusher.done():
            # A context of its own: not the first call's (its deadline and
            # request id would follow every later write).
            self._flusher = asyncio.create_task(self._flush_loop(), context=contextvars.Context())
        if len(self._pending) >= self.batch:
            self._wake.set()

    def _recorded(self, event: UsageEvent) -> None:  # noqa: B027 (an optional hook)
        """A hook: what a sink keeps in memory per recorded event."""

    @property
    def pending(self) -> int:
        return len(self._pending)

    def lag_seconds(self, now: float) -> float:
        """How long the oldest queued event has waited, at most (0: none)."""
        since = self._waiting_since
        if since is None or not self._pending:
            return 0.0
        return max(now - since, 0.0)

    async def _flush_loop(self) -> None:
        backoff = self.backoff_s
        while self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            self._wake.clear()
            try:
                await self.flush()
                backoff = self.backoff_s
            except Exception as error:  # an outage: keep every event, retry later
                log.warning(
                    "usage events not written yet (%d waiting; retry in %.1f s): %s",
                    len(self._pending),
                    backoff,
                    error,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def flush(self) -> None:
        """Writes everything queued now. Raises Unavailable on an outage (the
        events stay queued); drops, with an error log, only events refused
        on their own."""
        async with self._lock:
            await self._write_pending()

    async def _write_pending(self) -> None:
        """The caller holds ``_lock``. Writes what was queued when it began:
        events recorded meanwhile are appended behind and wait for the next
        flush (chasing them wrote a steady stream of calls a few rows at a
        time, at about 1 ms of CPU per write). Only this removes from the
        front."""
        began = time.monotonic()
        left = len(self._pending)
        while left > 0 and self._pending:
            events = self._pending[: min(self.batch, left)]
            try:
                await self._write(events)
            except Unavailable:
                raise
            except Exception as error:
                log.warning(
                    "a batch of %d usage events was refused (%s); writing them one by one",
                    len(events),
                    _first_line(error),
                )
                await self._write_one_by_one(events)
            WRITTEN.labels(self.name).inc(len(events))
            del self._pending[: len(events)]
            left -= len(events)
        # What is left was queued after this flush began: its start bounds
        # their wait (on an outage the raise above keeps the older bound).
        self._waiting_since = began if self._pending else None

    async def _write_one_by_one(self, events: list[UsageEvent]) -> None:
        for event in events:
            try:
                await self._write([event])
            except Unavailable:
                raise  # an outage after all: the whole batch is retried later
            except Exception as error:
                DROPPED.labels(self.name).inc()
                log.error(
                    "usage event %s (key %s, call %s) dropped: the ledger refused it: %s",
                    event.event_id,
                    event.key_id,
                    event.call_id,
                    _first_line(error),
                )

    async def close(self) -> None:
        """Writes what is left (best effort) and stops the background task."""
        with contextlib.suppress(Exception):
            await self.flush()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher


def _first_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:300]

"""Following what a serving component must hold for one model reference.

A component that serves ``digits@champion`` must hold the version the alias
points at and, beside it, every version the model's running experiments use
(A/B arms and the shadow), so the gateway can pin requests to them.
``follow_served`` yields that set (``ServedVersions``) now, then again
whenever it changes, from the registry's event stream:

- on every (re)connect it re-reads everything (resolve + running
  experiments), so a change made while it was away applies on return;
- an alias move of the followed alias, or any experiment change of the model,
  makes it re-read; a burst of events (the history replayed on connect, a
  flurry of moves) costs one read, not one per event;
- when the registry cannot be reached it retries with backoff
  (``retry_seconds`` doubling up to ``max_retry_seconds``); the event
  stream is the only trigger, there is no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import grpc
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh_sdk.reference import format_reference
from mlmesh_sdk.registry import RegistryClient

log = logging.getLogger("mlmesh.serving")
# Longest wait between two tries (of the registry, or of a version that keeps
# failing to load).
MAX_RETRY_SECONDS = 300.0
# Running experiments read per page.
PAGE_SIZE = 100
# How long a burst of events may take to land before one read covers it.
COALESCE_S = 0.02


def backoff_delays(first_s: float, cap_s: float = MAX_RETRY_SECONDS) -> Iterator[float]:
    """Waits between tries: ``first_s``, twice that, four times... up to
    ``cap_s``. A broken artifact under a followed alias is retried ever more
    rarely instead of every few seconds forever."""
    delay = max(first_s, 0.0)
    while True:
        yield min(delay, cap_s)
        delay = min(max(delay, 0.001) * 2, cap_s)


@dataclass(frozen=True)
class ServedVersions:
    """What to hold for one followed reference."""

    # The version the reference resolves to.
    served: pb.ModelVersion
    # Versions the model's running experiments use (arms and shadow), the
    # served one left out.
    experiments: frozenset[int]
    # The model's running experiments themselves (arms, weights, shadow), by
    # create time: what the gateway splits traffic by.
    running: tuple[pb.Experiment, ...] = ()

    @property
    def model(self) -> str:
        return self.served.model

    @property
    def versions(self) -> frozenset[int]:
        """Every version to hold: the served one and the experiments'."""
        return self.experiments | {self.served.version}

    def same_as(self, other: ServedVersions | None) -> bool:
        return (
            other is not None
            and other.served.version == self.served.version
            and other.experiments == self.experiments
        )

    def same_routing_as(self, other: ServedVersions | None) -> bool:
        """Also the same experiments (a weight or shadow change is a change)."""
        return self.same_as(other) and other is not None and other.running == self.running


async def read_served_versions(
    registry: RegistryClient, reference: ModelReference
) -> ServedVersions:
    """The registry's answer now: the reference's version and the versions
    of the model's running experiments."""
    served = await registry.resolve(reference)
    versions: set[int] = set()
    running: list[pb.Experiment] = []
    async for experiment in registry.list_experiments(
        reference.model, state=pb.EXPERIMENT_STATE_RUNNING, page_size=PAGE_SIZE
    ):
        running.append(experiment)
        versions |= {arm.version for arm in experiment.arms}
        if experiment.HasField("shadow"):
            versions.add(experiment.shadow.version)
    versions.discard(served.version)
    running.sort(key=lambda e: (e.create_time.seconds, e.create_time.nanos, e.name))
    return ServedVersions(served, frozenset(versions), tuple(running))


def _concerns(event: rpc.WatchEventsResponse, reference: ModelReference) -> bool:
    """Whether an event can change what ``reference`` holds."""
    kind = event.WhichOneof("event")
    if kind == "experiment_event":
        return True
    if kind == "alias_event":
        # A reference by version or by name alone is moved by no alias.
        return reference.WhichOneof("selector") == "alias" and (
            event.alias_event.alias == reference.alias
        )
    return False


async def follow_served(
    target: str,
    reference: ModelReference,
    retry_seconds: float = 2.0,
    max_retry_seconds: float = MAX_RETRY_SECONDS,
    same: Callable[[ServedVersions, ServedVersions | None], bool] = ServedVersions.same_as,
) -> AsyncIterator[ServedVersions]:
    """Yields what to hold for ``reference`` now and after every change;
    never ends. The caller may take as long as it likes between two items
    (loading a model): changes meanwhile are read when it asks again.
    ``same`` says which reads are no change (default: the same versions;
    ``ServedVersions.same_routing_as`` for one that routes by experiments)."""
    cursor = _Cursor()  # the last event seen: a reconnect resumes there
    last: ServedVersions | None = None
    text = format_reference(reference)
    delays = backoff_delays(retry_seconds, max_retry_seconds)
    while True:
        try:
            async with RegistryClient(target) as registry:
                changed = asyncio.Event()
                changed.set()  # (re)connected: read everything once
                watcher = asyncio.create_task(_watch(registry, reference, cursor, changed))
                try:
                    while True:
                        await _until_set_or_done(changed, watcher)
                        # Let a burst of events land, then read once for all.
                        await asyncio.sleep(COALESCE_S)
                        changed.clear()
                        now = await read_served_versions(registry, reference)
                        delays = backoff_delays(retry_seconds, max_retry_seconds)
                        if not same(now, last):
                            last = now
                            yield now
                finally:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await watcher
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, OSError) as error:
            delay = next(delays)
            detail = (
                f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
                if isinstance(error, grpc.RpcError)
                else str(error)
            )
            log.warning("following %s: %s; retrying in %.1f s", text, detail, delay)
            await asyncio.sleep(delay)


@dataclass
class _Cursor:
    after: int = 0


async def _watch(
    registry: RegistryClient, reference: ModelReference, cursor: _Cursor, changed: asyncio.Event
) -> None:
    """Sets ``changed`` on every event that concerns ``reference``; raises
    when the stream breaks or ends."""
    events = registry.stub.WatchEvents(
        rpc.WatchEventsRequest(models=[reference.model], after_sequence=cursor.after),
        metadata=registry.metadata,
    )
    async for event in events:
        cursor.after = event.sequence
        if _concerns(event, reference):
            changed.set()
    raise ConnectionResetError("the registry ended the event stream")


async def _until_set_or_done(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Returns when ``event`` is set; raises what ``task`` raised if it ends
    first (the event stream broke)."""
    if event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not event.is_set() and task.done():
        task.result()  # raises the stream's error
        raise ConnectionResetError("the registry ended the event stream")

"""ReviewSubmitter: a service's items for the human review queue, sent off
the request path.

``offer(item)`` never waits and never raises: it puts the item in a bounded
buffer, or drops it (counted in ``mlmesh_review_submissions{outcome="dropped"}``)
when the buffer is full. A background task sends what waits, up to 100 items
per SubmitItems call, with the process's service key (REVIEW_SUBMIT scope);
a failed call is logged and its items dropped: SubmitItems is idempotent by
source and source id, so nothing is lost that a later submission of the same
item would not add, and a down queue never backs up into the caller.

    submitter = ReviewSubmitter("127.0.0.1:8080")
    submitter.start()
    submitter.offer(review_pb2.Item(source=..., source_id=..., model=...))
    await submitter.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from mlmesh.review.v1 import review_pb2, review_service_pb2
from mlmesh.review.v1.review_service_pb2_grpc import ReviewServiceStub
from mlmesh_chassis.interceptors import client_interceptors
from mlmesh_chassis.metrics import REGISTRY
from prometheus_client import Counter

log = logging.getLogger("mlmesh.review.submitter")

SUBMISSIONS = Counter(
    "mlmesh_review_submissions",
    "Review items offered to the review queue, by outcome (sent, failed, dropped).",
    ["outcome"],
    registry=REGISTRY,
)
# SubmitItems takes at most 100 items a call.
MAX_BATCH = 100
# The texts' caps in mlmesh.review.v1.Item.
MAX_TEXT_CHARS = 16384
MAX_CONTEXT_CHARS = 1024


def cap(text: str, limit: int = MAX_TEXT_CHARS) -> tuple[str, bool]:
    """``text`` cut to ``limit`` characters (with "…" at the end when cut),
    and whether it was cut."""
    if len(text) <= limit:
        return text, False
    return text[: limit - 1] + "…", True


class ReviewSubmitter:
    """Bounded, batched, best-effort SubmitItems (see the module's doc)."""

    def __init__(self, target: str, capacity: int = 1000, timeout_s: float = 10.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._queue: asyncio.Queue[review_pb2.Item] = asyncio.Queue(maxsize=capacity)
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._channel = grpc.aio.insecure_channel(
                self.target, interceptors=client_interceptors()
            )
            self._task = asyncio.create_task(self._send_forever())

    def offer(self, item: review_pb2.Item) -> bool:
        """Queues ``item`` for the review queue; False when it was dropped."""
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            SUBMISSIONS.labels("dropped").inc()
            return False
        return True

    async def flush(self) -> None:
        """Waits until every item offered so far was sent (or failed)."""
        await self._queue.join()

    async def _send_forever(self) -> None:
        assert self._channel is not None
        stub = ReviewServiceStub(self._channel)
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await stub.SubmitItems(
                    review_service_pb2.SubmitItemsRequest(items=batch), timeout=self.timeout_s
                )
                SUBMISSIONS.labels("sent").inc(len(batch))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # best effort: logged, never raised
                SUBMISSIONS.labels("failed").inc(len(batch))
                detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else error
                log.warning("review submission of %d items failed: %s", len(batch), detail)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

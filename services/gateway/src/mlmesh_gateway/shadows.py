"""Shadow traffic (A/B experiments' mirrored requests): run off the
callers' path, compared with the primary's answer, recorded for review.

Every comparison is a row of ``shadow_results``. A disagreement is also
submitted to the human review queue (mlmesh.review.v1, when the gateway is
given its address): the inputs, both outputs and the diff, each capped,
through a bounded best-effort submitter (mlmesh_sdk.review) that drops
rather than queues without limit and never reaches the caller."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa
from mlmesh.registry.v1 import model_pb2
from mlmesh.review.v1 import review_pb2
from mlmesh_chassis.context import deadline_var
from mlmesh_chassis.database import Database
from mlmesh_sdk.review import MAX_CONTEXT_CHARS, ReviewSubmitter, cap
from sqlalchemy import exc

log = logging.getLogger("mlmesh.gateway")
# Shadow answers farther than this (max absolute difference) from the primary's
# are recorded as disagreeing.
SHADOW_TOLERANCE = 1e-3
# Each shadow's own deadline (the caller's call has ended by then).
SHADOW_TIMEOUT_S = 60.0
# Values of each tensor shown to reviewers (the text is capped as well).
REVIEW_TENSOR_VALUES = 256
# Characters of each string value shown (a BYTES element may be megabytes:
# it is cut before it is decoded).
REVIEW_VALUE_CHARS = 256
# The review queue's model names and source ids (mlmesh.review.v1.Item).
_REVIEW_MODEL = re.compile(r"[a-z][a-z0-9-]{1,62}")
_REVIEW_SOURCE_ID = re.compile(r"[\x20-\x7e]{1,128}")


@dataclass(frozen=True)
class ShadowComparison:
    """A shadow's answer against the primary's: the max absolute difference
    and, for the review queue, the inputs and both outputs as text."""

    diff: float
    kind: str = ""
    inputs: str = ""
    primary_output: str = ""
    shadow_output: str = ""
    context: dict[str, str] = field(default_factory=dict)


def _shown(value: object) -> str:
    """A string element for a reviewer, cut to REVIEW_VALUE_CHARS (bytes are
    cut before decoding, a little over for a split multi-byte character)."""
    if isinstance(value, bytes):
        return value[: 4 * REVIEW_VALUE_CHARS].decode("utf-8", "replace")[:REVIEW_VALUE_CHARS]
    return (value if isinstance(value, str) else str(value))[:REVIEW_VALUE_CHARS]


def render_tensors(tensors: Mapping[str, np.ndarray]) -> str:
    """Tensors as JSON for a reviewer: dtype, shape and the first values."""
    shown: dict[str, object] = {}
    for name, array in tensors.items():
        flat = np.asarray(array).ravel()[:REVIEW_TENSOR_VALUES]
        if flat.dtype.kind in "OSU":
            values: list[object] = [_shown(v) for v in flat]
        else:
            values = flat.tolist()
        shown[name] = {
            "dtype": str(array.dtype),
            "shape": list(np.shape(array)),
            "values": values,
            "truncated": int(np.size(array)) > len(values),
        }
    return json.dumps(shown)


metadata = sa.MetaData()
shadow_results = sa.Table(
    "shadow_results",
    metadata,
    # The primary call's server-made call id (a caller's request id could be
    # reused, and would make the second comparison vanish).
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("experiment", sa.String(63), nullable=False),
    sa.Column("model", sa.String(63), nullable=False),
    sa.Column("primary_version", sa.BigInteger, nullable=False),
    sa.Column("shadow_version", sa.BigInteger, nullable=False),
    sa.Column("max_abs_diff", sa.Float, nullable=False),
    sa.Column("agreed", sa.Boolean, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)


class ShadowLog:
    def __init__(self, database: Database, review_target: str = "") -> None:
        self.db = database
        # The review queue's submitter (None: disagreements are not submitted).
        self.reviews = ReviewSubmitter(review_target) if review_target else None

    async def record(
        self,
        call_id: str,
        experiment: str,
        model: str,
        primary_version: int,
        shadow_version: int,
        max_abs_diff: float,
        agreed: bool,
        comparison: ShadowComparison | None = None,
    ) -> None:
        """One shadow comparison (where primary and shadow answers disagree
        beyond the tolerance, ``agreed`` is False). A first-recorded
        disagreement with its ``comparison`` also goes to the review queue."""
        try:
            async with self.db.write() as c:
                await c.execute(
                    shadow_results.insert().values(
                        request_id=call_id,
                        experiment=experiment,
                        model=model,
                        primary_version=primary_version,
                        shadow_version=shadow_version,
                        max_abs_diff=max_abs_diff,
                        agreed=agreed,
                        create_time=dt.datetime.now(dt.UTC),
                    )
                )
        except exc.IntegrityError:
            return
        if not agreed and comparison is not None:
            self.submit_for_review(
                call_id, experiment, model, (primary_version, shadow_version), comparison
            )

    def submit_for_review(
        self,
        call_id: str,
        experiment: str,
        model: str,
        versions: tuple[int, int],
        comparison: ShadowComparison,
    ) -> bool:
        """Offers the disagreement to the review queue (never waits or
        raises); False when it was not offered or was dropped."""
        if self.reviews is None:
            return False
        if not _REVIEW_MODEL.fullmatch(model) or not _REVIEW_SOURCE_ID.fullmatch(call_id):
            log.warning("shadow of %s not submitted for review: unusable ids", call_id[:64])
            return False
        inputs, inputs_cut = cap(comparison.inputs)
        primary, primary_cut = cap(comparison.primary_output)
        shadow, shadow_cut = cap(comparison.shadow_output)
        context = {
            "experiment": experiment,
            "kind": comparison.kind,
            "max_abs_diff": f"{comparison.diff:.6g}",
            **comparison.context,
        }
        cut = [
            n
            for n, c in (("inputs", inputs_cut), ("primary", primary_cut), ("shadow", shadow_cut))
            if c
        ]
        if cut:
            context["truncated"] = ",".join(cut)
        item = review_pb2.Item(
            source=review_pb2.ITEM_SOURCE_SHADOW_DISAGREEMENT,
            source_id=call_id,
            model=model,
            model_version=str(versions[0]),
            alternative_version=str(versions[1]),
            inputs=inputs,
            primary_output=primary,
            alternative_output=shadow,
            context={k[:63]: cap(v, MAX_CONTEXT_CHARS)[0] for k, v in list(context.items())[:32]},
            request_id=call_id,
        )
        self.reviews.start()
        return self.reviews.offer(item)

    async def close(self) -> None:
        if self.reviews is not None:
            await self.reviews.close()


class ShadowRunner:
    """Mirrors requests to shadow versions, at most ``limit`` at once: when
    that many run, a new one is dropped (shadows are best effort and never
    queue); a failing shadow is logged and never reaches the caller."""

    def __init__(self, shadows: ShadowLog | None, limit: int = 16) -> None:
        self.shadows = shadows
        self._running = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(
        self,
        call_id: str,
        experiment: model_pb2.Experiment,
        model: str,
        versions: tuple[int, int],
        difference: Callable[[], Awaitable[ShadowComparison]],
    ) -> None:
        """Runs ``difference()`` (the shadow's answer against the primary's:
        the max absolute difference and, when they disagree, the texts a
        reviewer sees) for ``versions`` (primary, shadow) and records it
        under the primary's ``call_id``."""
        shadows = self.shadows
        if shadows is None or self._running.locked():
            return

        async def run() -> None:
            async with self._running:
                deadline_var.set(time.monotonic() + SHADOW_TIMEOUT_S)
                try:
                    comparison = await difference()
                    diff = comparison.diff
                    await shadows.record(
                        call_id,
                        experiment.name,
                        model,
                        *versions,
                        diff,
                        diff <= SHADOW_TOLERANCE,
                        comparison=comparison,
                    )
                except Exception as error:  # a shadow never affects the caller
                    log.warning("shadow of %s failed: %s", call_id, error)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def max_abs_difference(primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray]) -> float:
    """How far the shadow's outputs are from the primary's (every output)."""
    return max(
        float(np.max(np.abs(primary[n].astype(np.float64) - shadow[n].astype(np.float64))))
        for n in primary
    )

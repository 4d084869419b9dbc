"""Low-confidence predictions to the human review queue.

Per model, a policy ``threshold:max_rate``: when, over the window, more
than ``max_rate`` of the model's classifier predictions have a confidence
under ``threshold`` (and there are at least ``min_predictions``), the
newest of those low-confidence predictions are submitted to the review
queue (``ReviewService.SubmitItems``, source LOW_CONFIDENCE, source id the
request id: the queue keeps one item per id however often it is sent).
Checked by the periodic refresher, never per request."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from mlmesh.monitor.v1 import monitor_pb2 as pb

from mlmesh_monitor.store import MonitorStore
from mlmesh_monitor.telemetry import REVIEW_SUBMITTED

log = logging.getLogger("mlmesh.monitor")
_MODEL = re.compile(r"[a-z][a-z0-9-]{1,62}")
# The review contract's caps (mlmesh.review.v1.Item).
MAX_TEXT = 16384
MAX_BATCH = 100
# Request ids sent already (the queue would dedupe them; this saves the calls).
REMEMBERED = 10_000


@dataclass(frozen=True)
class Policy:
    threshold: float
    max_rate: float


def parse_policies(spec: str) -> dict[str, Policy]:
    """``model=threshold:max_rate,...`` (both 0 to 1), e.g. ``digits=0.6:0.2``."""
    policies: dict[str, Policy] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        model, _, rest = part.strip().partition("=")
        threshold, _, rate = rest.partition(":")
        try:
            policy = Policy(float(threshold), float(rate))
        except ValueError:
            policy = Policy(-1.0, -1.0)
        if not (
            _MODEL.fullmatch(model)
            and 0.0 < policy.threshold <= 1.0
            and 0.0 <= policy.max_rate <= 1.0
        ):
            raise ValueError(f"bad low-confidence policy {part.strip()[:80]!r}: want model=t:r")
        policies[model] = policy
    return policies


Submit = Callable[[list[object]], Awaitable[int]]


class LowConfidenceReview:
    def __init__(
        self,
        store: MonitorStore,
        policies: dict[str, Policy],
        submit: Submit,
        *,
        window: dt.timedelta,
        min_predictions: int,
        max_items: int,
    ) -> None:
        self.store = store
        self.policies = policies
        self.submit = submit
        self.window = window
        self.min_predictions = min_predictions
        self.max_items = min(max_items, MAX_BATCH)
        self._sent: collections.OrderedDict[str, None] = collections.OrderedDict()

    async def check(self, now: dt.datetime | None = None) -> int:
        """Submits the models' low-confidence predictions where the rate is
        over the policy; returns how many items were sent."""
        since = (now or dt.datetime.now(dt.UTC)) - self.window
        sent = 0
        for model, policy in self.policies.items():
            # Ids already sent are passed over in the store: only the items
            # sent now are read whole.
            total, low, fresh = await self.store.low_confidence(
                model, since, policy.threshold, self.max_items, skip=self._sent
            )
            if total < self.min_predictions or low <= policy.max_rate * total:
                continue
            if not fresh:
                continue
            rate = low / total
            # Up to 100 items of up to 4096 features as JSON: off the loop.
            items = await asyncio.to_thread(review_items, fresh, policy, rate)
            created = await self.submit(items)
            for r in fresh:
                self._sent[r.request_id] = None
            while len(self._sent) > REMEMBERED:
                self._sent.popitem(last=False)
            REVIEW_SUBMITTED.labels(model).inc(len(items))
            log.info(
                "low-confidence predictions sent for review",
                extra={"model": model, "items": len(items), "created": created},
            )
            sent += len(items)
        return sent


def review_item(p: pb.Prediction, policy: Policy, rate: float) -> object:
    from mlmesh.review.v1 import review_pb2 as rpb

    scores = np.asarray(p.scores, dtype=np.float64)
    runner_up = ""
    others = [int(i) for i in np.argsort(scores)[::-1] if str(int(i)) != p.predicted_label]
    if len(scores) >= 2 and others:  # the best class other than the one predicted
        runner_up = json.dumps({"label": str(others[0]), "score": float(scores[others[0]])})
    features = [round(float(x), 6) for x in p.features]
    inputs = json.dumps({"features": features, "input_sha256": p.input_sha256})
    shortened = len(inputs) > MAX_TEXT
    if shortened:
        inputs = json.dumps({"input_sha256": p.input_sha256})
    return rpb.Item(
        source=rpb.ITEM_SOURCE_LOW_CONFIDENCE,
        source_id=p.request_id,
        model=p.model,
        model_version=str(p.version) if p.version else "",
        inputs=inputs,
        primary_output=json.dumps({"label": p.predicted_label, "confidence": p.confidence})[
            :MAX_TEXT
        ],
        alternative_output=runner_up,
        context={
            "confidence": f"{p.confidence:.4f}",
            "threshold": f"{policy.threshold:g}",
            "low_confidence_rate": f"{rate:.4f}",
            "max_rate": f"{policy.max_rate:g}",
            "inputs_shortened": "true" if shortened else "false",
        },
        request_id=p.request_id,
    )


def review_items(rows: list[pb.Prediction], policy: Policy, rate: float) -> list[object]:
    return [review_item(r, policy, rate) for r in rows]


def review_submitter(target: str) -> tuple[Submit, Callable[[], Awaitable[None]]]:
    """SubmitItems on the review service with this service's own key; and
    the channel's close."""
    import grpc
    from mlmesh.review.v1 import review_service_pb2 as rrpc
    from mlmesh.review.v1 import review_service_pb2_grpc
    from mlmesh_chassis.channels import MESSAGE_SIZE_OPTIONS
    from mlmesh_chassis.interceptors import client_interceptors

    channel = grpc.aio.insecure_channel(
        target, interceptors=client_interceptors(), options=MESSAGE_SIZE_OPTIONS
    )
    stub = review_service_pb2_grpc.ReviewServiceStub(channel)

    async def submit(items: list[object]) -> int:
        response = await stub.SubmitItems(
            rrpc.SubmitItemsRequest(items=items),  # type: ignore[arg-type]
            timeout=10.0,
        )
        return int(response.created_count)

    return submit, channel.close

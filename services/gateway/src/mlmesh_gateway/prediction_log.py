"""PredictionLog: a sample of the gateway's model calls, sent to the
monitor (``MonitorService.LogPredictions``) off the request path.

On the request path a call costs a sampling check and, when sampled, one
small object kept by reference and appended to a bounded deque at the
call's end: no copying, hashing or serialisation there. A background
flusher takes batches from the deque, builds the records a few at a time
between requests (sha256 of the request's bytes, the first input row as
features, the first output row as scores, a classifier's label and
confidence, text capped) and sends them with the gateway's service key. A full queue
drops the newest call and counts it; a monitor that is down or slow costs
the flusher a bounded timeout and the batch (counted), never a request.

Every Infer, Embed and Generate (gRPC or the OpenAI surface) goes through
``observe``; the record's request id is the gateway's call id, which
Infer returns in its ``x-mlmesh-call-id`` trailer (and as the response id
when the caller sent none) and Generate in its ``x-mlmesh-call-id``
header: the id RecordFeedback names.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from google.protobuf import timestamp_pb2
from mlmesh.monitor.v1 import monitor_pb2 as mpb
from mlmesh.monitor.v1 import monitor_service_pb2 as mrpc
from mlmesh_chassis.metrics import REGISTRY
from mlmesh_metering import MeteredCall
from mlmesh_metering.metering import status_of
from prometheus_client import Counter, Gauge

log = logging.getLogger("mlmesh.gateway")

INFER = mpb.PREDICTION_KIND_INFER
GENERATE = mpb.PREDICTION_KIND_GENERATE
EMBED = mpb.PREDICTION_KIND_EMBED

# The contract's caps (mlmesh.monitor.v1.Prediction).
MAX_FEATURES = 4096
MAX_SCORES = 1024
MAX_TEXT = 4096
MAX_LATENCY_S = 3600.0
MAX_BATCH = 500
# Records built per turn of the event loop (~20 us each): the loop serves
# requests between slices. Not a worker thread: one holding the GIL while it
# built a batch stalled the loop for milliseconds (+1.1 ms Infer p99 in
# bench/prediction_logging.py).
SLICE = 8
# Records of larger requests are built in a worker thread.
INLINE_BYTES = 64 * 1024
_MODEL = re.compile(r"[a-z][a-z0-9-]{1,62}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_STATUS = re.compile(r"[A-Z_]{2,32}")

PREDICTIONS = Counter(
    "mlmesh_gateway_predictions_logged",
    "Sampled model calls by fate: sent to the monitor, dropped_queue_full, "
    "failed (the monitor refused or was unreachable), invalid (not recordable).",
    ["outcome"],
    registry=REGISTRY,
)
QUEUED = Gauge(
    "mlmesh_gateway_predictions_queued",
    "Sampled calls waiting for the flusher.",
    registry=REGISTRY,
)

Send = Callable[[mrpc.LogPredictionsRequest], Awaitable[object]]


class Observed:
    """One sampled call: filled in by the handler (``inputs``, ``outputs``,
    ``text``), appended to the log when the call ends."""

    __slots__ = (
        "call",
        "end",
        "inputs",
        "kind",
        "latency",
        "log",
        "outputs",
        "request",
        "status",
        "text",
    )

    def __init__(self, log: PredictionLog, kind: int, call: MeteredCall, request: Any) -> None:
        self.log = log
        self.kind = kind
        self.call = call
        self.request = request
        self.inputs: Mapping[str, np.ndarray] | None = None
        self.outputs: Mapping[str, np.ndarray] | None = None
        self.text: list[str] | None = None
        self.status = "OK"
        self.end = 0.0
        self.latency = 0.0

    async def __aenter__(self) -> Observed:
        return self

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        if error is not None:
            self.status = status_of(error)
        self.latency = time.monotonic() - self.call.started
        self.end = time.time()
        self.log.append(self)
        return False


class _NotSampled:
    """The context of a call that is not logged: does nothing."""

    __slots__ = ()
    inputs = outputs = text = None

    async def __aenter__(self) -> _NotSampled:
        return self

    async def __aexit__(self, *exc: object) -> bool:
        return False

    def __setattr__(self, name: str, value: object) -> None:  # the handler's fills: ignored
        pass


NOT_SAMPLED = _NotSampled()


def parse_rates(spec: str) -> dict[str, float]:
    """``model=rate,model=rate`` (rates 0 to 1)."""
    rates: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        model, _, rate = part.partition("=")
        value = float(rate)
        if not 0.0 <= value <= 1.0 or not _MODEL.fullmatch(model.strip()):
            raise ValueError(f"bad sample rate {part.strip()[:80]!r}: want model=0..1")
        rates[model.strip()] = value
    return rates


class PredictionLog:
    def __init__(
        self,
        send: Send | None,
        *,
        sample_rate: float = 1.0,
        rates: Mapping[str, float] | None = None,
        queue_size: int = 10_000,
        batch_size: int = 200,
        flush_seconds: float = 1.0,
        timeout_seconds: float = 2.0,
    ) -> None:
        self.send = send
        self.sample_rate = sample_rate if send is not None else 0.0
        self.rates = dict(rates or {}) if send is not None else {}
        self.queue: collections.deque[Observed] = collections.deque()
        self.queue_size = queue_size
        self.batch_size = min(max(batch_size, 1), MAX_BATCH)
        self.flush_seconds = flush_seconds
        self.timeout_seconds = timeout_seconds
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The channel ``send`` uses, closed with the log.
        self.channel: Any = None

    @property
    def enabled(self) -> bool:
        return self.send is not None

    # ---- the request path --------------------------------------------------------

    def observe(self, kind: int, model: str, call: MeteredCall, request: Any) -> Any:
        """``async with`` around a call's work: an ``Observed`` when sampled."""
        rate = self.rates.get(model, self.sample_rate) if self.rates else self.sample_rate
        if rate <= 0.0 or (rate < 1.0 and random.random() >= rate):
            return NOT_SAMPLED
        return Observed(self, kind, call, request)

    def append(self, observed: Observed) -> None:
        if len(self.queue) >= self.queue_size:
            PREDICTIONS.labels("dropped_queue_full").inc()
            return
        self.queue.append(observed)
        if len(self.queue) >= self.batch_size:
            self._full.set()

    # ---- the flusher -------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.flush_seconds)
            self._full.clear()
            await self.flush()

    async def flush(self) -> None:
        """Sends everything queued now, a batch at a time."""
        while self.queue:
            batch = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
            QUEUED.set(len(self.queue))
            records: list[mpb.Prediction] = []
            for start in range(0, len(batch), SLICE):  # a few at a time, between requests
                part = batch[start : start + SLICE]
                if any(_heavy(observed) for observed in part):
                    # Hashing a large request would stall every call on the loop.
                    records.extend(await asyncio.to_thread(build_records, part))
                else:
                    records.extend(build_records(part))
                    await asyncio.sleep(0)
            if len(records) < len(batch):
                PREDICTIONS.labels("invalid").inc(len(batch) - len(records))
            if not records or self.send is None:
                continue
            try:
                await asyncio.wait_for(
                    self.send(mrpc.LogPredictionsRequest(predictions=records)),
                    self.timeout_seconds,
                )
            except Exception as error:  # down, slow, refused: the batch is lost, counted
                PREDICTIONS.labels("failed").inc(len(records))
                log.warning("prediction log batch of %d lost: %s", len(records), error)
            else:
                PREDICTIONS.labels("sent").inc(len(records))
        QUEUED.set(0)

    async def close(self) -> None:
        """Stops the flusher after one last bounded flush."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), self.timeout_seconds)
        except Exception as error:  # shutting down: best effort
            log.info("prediction log: last flush incomplete: %s", error)
        if self.channel is not None:
            await self.channel.close()


# ---- building records (the flusher, between requests) -----------------------------


def build_records(batch: list[Observed]) -> list[mpb.Prediction]:
    records = []
    for observed in batch:
        try:
            record = build_record(observed)
        except Exception:  # an odd input must not take the batch down
            log.debug("prediction not recordable", exc_info=True)
            continue
        if record is not None:
            records.append(record)
    return records


def build_record(o: Observed) -> mpb.Prediction | None:
    call = o.call
    latency = min(max(o.latency, 0.0), MAX_LATENCY_S)
    if not (
        _MODEL.fullmatch(call.model)
        and _KEY_ID.fullmatch(call.key_id)
        and _REQUEST_ID.fullmatch(call.call_id)
    ):
        return None
    record = mpb.Prediction(
        request_id=call.call_id,
        kind=o.kind,  # type: ignore[arg-type]
        model=call.model,
        version=max(int(call.version), 0),
        key_id=call.key_id,
        input_sha256=_input_hash(o.kind, o.request),
        status=o.status if _STATUS.fullmatch(o.status) else "UNKNOWN",
    )
    record.latency.FromNanoseconds(int(latency * 1e9))
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int((o.end - latency) * 1e9))
    record.time.CopyFrom(stamp)
    if o.inputs:
        record.features.extend(_first_row(next(iter(o.inputs.values())), MAX_FEATURES))
    if o.outputs:
        scores = _first_row(next(iter(o.outputs.values())), MAX_SCORES)
        record.scores.extend(scores)
        if len(scores) >= 2:
            best = int(np.argmax(scores))
            record.predicted_label = str(best)
            record.confidence = _confidence(np.asarray(scores, dtype=np.float64), best)
    if o.text:
        record.output_text = "".join(o.text)[:MAX_TEXT]
    return record


def _heavy(observed: Observed) -> bool:
    """Whether building this record (serialising and hashing the request)
    is too much work for the event loop."""
    request = observed.request
    if observed.kind == EMBED:
        return sum(len(text) for text in request) > INLINE_BYTES
    return bool(request.ByteSize() > INLINE_BYTES)


def _input_hash(kind: int, request: Any) -> str:
    if kind == GENERATE:
        copy = type(request)()
        copy.CopyFrom(request)
        copy.request_id = ""  # the gateway wrote its call id there
        data = copy.SerializeToString(deterministic=True)
    elif kind == EMBED:
        data = "\x00".join(request).encode()
    else:
        data = request.SerializeToString(deterministic=True)
    return hashlib.sha256(data).hexdigest()


def _first_row(array: Any, cap: int) -> list[float]:
    """The first row of a numeric tensor, flattened, when it has at most
    ``cap`` finite values (else nothing)."""
    values = np.asarray(array)
    if values.dtype.kind not in "fiub" or values.size == 0:
        return []
    row = values[0] if values.ndim >= 2 else values
    flat = row.reshape(-1)
    if flat.size > cap:
        return []
    out = flat.astype(np.float32)
    if not np.isfinite(out).all():
        return []
    row_values: list[float] = out.tolist()
    return row_values


def _confidence(scores: np.ndarray, best: int) -> float:
    """The best class's probability: the score itself when the scores are
    probabilities, their softmax otherwise."""
    if np.all((scores >= 0) & (scores <= 1)) and math.isclose(scores.sum(), 1.0, abs_tol=1e-3):
        return float(scores[best])
    shifted = np.exp(scores - scores.max())
    return float(min(max(shifted[best] / shifted.sum(), 0.0), 1.0))


def prediction_log(settings: Any) -> PredictionLog:
    """The gateway's log from its settings (GatewaySettings.monitor_target
    and prediction_*): off without a monitor. Its channel carries the
    gateway's service key (the chassis' client interceptors)."""
    if not settings.monitor_target:
        return PredictionLog(None)
    import grpc
    from mlmesh.monitor.v1 import monitor_service_pb2_grpc
    from mlmesh_chassis.channels import MESSAGE_SIZE_OPTIONS
    from mlmesh_chassis.interceptors import client_interceptors

    channel = grpc.aio.insecure_channel(
        settings.monitor_target,
        interceptors=client_interceptors(),
        options=MESSAGE_SIZE_OPTIONS,
    )
    stub = monitor_service_pb2_grpc.MonitorServiceStub(channel)
    log_ = PredictionLog(
        stub.LogPredictions,
        sample_rate=settings.prediction_sample_rate,
        rates=parse_rates(settings.prediction_sample_rates),
        queue_size=settings.prediction_queue_size,
        batch_size=settings.prediction_batch_size,
        flush_seconds=settings.prediction_flush_seconds,
        timeout_seconds=settings.prediction_send_timeout_seconds,
    )
    log_.channel = channel
    return log_

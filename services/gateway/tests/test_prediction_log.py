"""The gateway's prediction log, alone: sampling (default and per model), the
bounded queue dropping and counting, records built off the request path
(hash, features, scores, label, confidence; nothing unrecordable sent), and
a monitor that fails or hangs costing the flusher its batch, never the call."""

from __future__ import annotations

import asyncio
import hashlib
import random

import grpc
import numpy as np
import pytest
from mlmesh.gateway.v1 import gateway_service_pb2 as gw
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh.monitor.v1 import monitor_pb2 as mpb
from mlmesh_chassis.metrics import REGISTRY
from mlmesh_gateway.prediction_log import (
    EMBED,
    GENERATE,
    INFER,
    NOT_SAMPLED,
    Observed,
    PredictionLog,
    build_record,
    parse_rates,
)
from mlmesh_metering import MeteredCall

KEY_ID = "0123456789abcdef"


def call(model: str = "digits", call_id: str = "", key_id: str = KEY_ID) -> MeteredCall:
    return MeteredCall(
        key_id=key_id,
        call_id=call_id or f"{random.getrandbits(64):016x}",
        request_id="",
        service=0,
        model=model,
        unit="items",
        reserved=0,
        version=3,
    )


def outcome(name: str) -> float:
    return (
        REGISTRY.get_sample_value("mlmesh_gateway_predictions_logged_total", {"outcome": name})
        or 0.0
    )


class Recorder:
    def __init__(self, error: BaseException | None = None, hang: bool = False) -> None:
        self.sent: list[mpb.Prediction] = []
        self.error = error
        self.hang = hang

    async def __call__(self, request):  # type: ignore[no-untyped-def]
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        self.sent.extend(request.predictions)


async def test_sampling_by_default_rate_and_per_model():
    log = PredictionLog(Recorder(), sample_rate=0.0, rates={"digits": 1.0})
    assert log.observe(INFER, "minilm", call("minilm"), None) is NOT_SAMPLED
    assert isinstance(log.observe(INFER, "digits", call(), None), Observed)
    random.seed(16)
    half = PredictionLog(Recorder(), sample_rate=0.5)
    picked = sum(
        isinstance(half.observe(INFER, "digits", call(), None), Observed) for _ in range(2000)
    )
    assert 800 < picked < 1200
    off = PredictionLog(None, sample_rate=1.0)  # no monitor: nothing is ever sampled
    assert off.observe(INFER, "digits", call(), None) is NOT_SAMPLED
    assert parse_rates(" digits=1 , tiny-llama=0.25") == {"digits": 1.0, "tiny-llama": 0.25}
    for bad in ("digits=2", "Digits=1", "digits"):
        with pytest.raises(ValueError):
            parse_rates(bad)


async def test_a_full_queue_drops_and_counts():
    log = PredictionLog(Recorder(), queue_size=3)
    before = outcome("dropped_queue_full")
    for _ in range(5):
        async with log.observe(INFER, "digits", call(), gw.InferRequest()):
            pass
    assert len(log.queue) == 3
    assert outcome("dropped_queue_full") - before == 2


async def test_the_handler_sees_its_own_errors_and_the_status_is_recorded():
    log = PredictionLog(Recorder())
    with pytest.raises(KeyError):
        async with log.observe(INFER, "digits", call(), gw.InferRequest()):
            raise KeyError("boom")

    class Unavailable(Exception):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

    with pytest.raises(Unavailable):
        async with log.observe(INFER, "digits", call(), gw.InferRequest()):
            raise Unavailable()
    assert [o.status for o in log.queue] == ["INTERNAL", "UNAVAILABLE"]


async def test_records_hash_the_request_and_keep_capped_rows():
    request = gw.InferRequest(id="mine")
    observed = Observed(PredictionLog(Recorder()), INFER, call(call_id="c" * 32), request)
    pixels = np.arange(128, dtype=np.float32).reshape(2, 64)
    probabilities = np.array([[0.1, 0.7, 0.2], [1.0, 0.0, 0.0]], dtype=np.float32)
    observed.inputs = {"pixels": pixels}
    observed.outputs = {"probabilities": probabilities}
    observed.latency, observed.end = 0.004, 1_800_000_000.0
    record = build_record(observed)
    assert record is not None
    assert record.request_id == "c" * 32 and record.version == 3 and record.key_id == KEY_ID
    assert (
        record.input_sha256
        == hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
    )
    assert list(record.features) == list(range(64))  # the first row
    assert record.predicted_label == "1" and record.confidence == pytest.approx(0.7)
    assert record.latency.ToNanoseconds() == 4_000_000
    assert record.time.ToNanoseconds() == int((1_800_000_000.0 - 0.004) * 1e9)
    # Logits rather than probabilities: the confidence is their softmax.
    observed.outputs = {"logits": np.array([[2.0, 0.0]], dtype=np.float32)}
    logits = build_record(observed)
    assert logits is not None
    assert logits.confidence == pytest.approx(1 / (1 + np.exp(-2.0)))
    # Non-finite or oversized inputs: no features, the call is still recorded.
    observed.inputs = {"x": np.array([[np.nan, 1.0]], dtype=np.float32)}
    assert list(build_record(observed).features) == []  # type: ignore[union-attr]
    observed.inputs = {"x": np.zeros((1, 5000), dtype=np.float32)}
    assert list(build_record(observed).features) == []  # type: ignore[union-attr]
    # What the contract would refuse is left out, not sent.
    assert build_record(Observed(observed.log, INFER, call(key_id="nothex"), request)) is None


async def test_generate_hash_ignores_the_call_id_and_text_is_capped():
    inner = llm_rpc.GenerateRequest(text="hello", request_id="one")
    observed = Observed(PredictionLog(Recorder()), GENERATE, call("tiny-llama"), inner)
    observed.text = ["x" * 3000, "y" * 3000]
    record = build_record(observed)
    other = llm_rpc.GenerateRequest(text="hello", request_id="two")
    assert record is not None and len(record.output_text) == 4096
    assert (
        record.input_sha256
        == build_record(  # type: ignore[union-attr]
            Observed(observed.log, GENERATE, call("tiny-llama"), other)
        ).input_sha256
    )
    embed = build_record(Observed(observed.log, EMBED, call("minilm"), ["a", "b"]))
    assert embed is not None and embed.input_sha256 == hashlib.sha256(b"a\x00b").hexdigest()


async def test_a_failing_or_hanging_monitor_costs_the_batch_not_the_call():
    failing = PredictionLog(Recorder(error=ConnectionError("down")), timeout_seconds=5)
    before = outcome("failed")
    async with failing.observe(INFER, "digits", call(), gw.InferRequest()) as seen:
        seen.outputs = {"p": np.array([[0.5, 0.5]], dtype=np.float32)}
    await failing.flush()  # does not raise
    assert outcome("failed") - before == 1 and not failing.queue
    hanging = PredictionLog(Recorder(hang=True), timeout_seconds=0.05)
    async with hanging.observe(INFER, "digits", call(), gw.InferRequest()):
        pass
    await hanging.flush()  # gives up on the send after its timeout
    assert outcome("failed") - before == 2


async def test_the_flusher_sends_in_bounded_batches():
    recorder = Recorder()
    batches: list[int] = []

    async def send(request):  # type: ignore[no-untyped-def]
        batches.append(len(request.predictions))
        await recorder(request)

    log = PredictionLog(send, batch_size=4, flush_seconds=3600)
    for _ in range(10):
        async with log.observe(INFER, "digits", call(), gw.InferRequest()):
            pass
    await log.flush()
    assert batches == [4, 4, 2] and len(recorder.sent) == 10
    assert len({p.request_id for p in recorder.sent}) == 10
    # The background flusher: woken by a full batch, not by the clock.
    log.start()
    for _ in range(4):
        async with log.observe(INFER, "digits", call(), gw.InferRequest()):
            pass
    for _ in range(200):
        if len(recorder.sent) == 14:
            break
        await asyncio.sleep(0.01)
    assert len(recorder.sent) == 14
    await log.close()


async def test_a_large_request_is_hashed_in_a_worker_thread(monkeypatch):
    import threading

    from mlmesh_gateway import prediction_log

    threads: list[str] = []
    real = prediction_log._input_hash

    def spy(kind, request):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real(kind, request)

    monkeypatch.setattr(prediction_log, "_input_hash", spy)
    recorder = Recorder()
    log = PredictionLog(recorder, flush_seconds=3600)
    small = gw.InferRequest(id="small")
    large = gw.InferRequest(id="large")
    large.inputs.add(name="x", datatype="UINT8", shape=[1, 262144], raw_contents=bytes(262144))
    async with log.observe(INFER, "digits", call(), small):
        pass
    await log.flush()
    async with log.observe(INFER, "digits", call(), large):
        pass
    await log.flush()
    main = threading.current_thread().name
    assert threads[0] == main and threads[1] != main
    assert (
        recorder.sent[1].input_sha256
        == hashlib.sha256(large.SerializeToString(deterministic=True)).hexdigest()
    )

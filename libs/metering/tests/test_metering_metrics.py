"""The metrics the SLO rules read from metering: throttle rejections per key
(``mlmesh_throttle_rejections_total``) and the usage queue's flush lag
(``mlmesh_usage_flush_lag_seconds``, ``mlmesh_usage_events_pending``)."""

from __future__ import annotations

import asyncio
import time

import pytest
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.errors import ResourceExhausted, Unavailable
from mlmesh_chassis.metrics import REGISTRY
from mlmesh_metering.batcher import UsageBatcher
from mlmesh_metering.events import UsageEvent
from mlmesh_metering.metering import Metering
from mlmesh_metering.throttle import Limits, Throttle


class Gated(UsageBatcher):
    """A sink that is down (Unavailable) until ``up`` is set."""

    name = "gated-test"

    def __init__(self) -> None:
        super().__init__(flush_s=3600, backoff_s=3600)
        self.up = False
        self.written: list[UsageEvent] = []

    async def _write(self, events: list[UsageEvent]) -> None:
        if not self.up:
            raise Unavailable("the test's ledger is down")
        self.written.extend(events)


def _sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def _event(call_id: str) -> UsageEvent:
    return UsageEvent(key_id="k1", call_id=call_id, service=1, unit="requests", quantity=1)


async def test_a_refused_call_counts_against_its_key_and_limit():
    sink = Gated()
    sink.up = True
    meter = Metering(Throttle(), sink, pb.PLATFORM_SERVICE_REGISTRY)
    labels = {"key_id": "00000000000000aa", "limit": "requests_per_minute"}
    other = {"key_id": "00000000000000bb", "limit": "requests_per_minute"}
    before = _sample("mlmesh_throttle_rejections_total", labels) or 0.0
    before_other = _sample("mlmesh_throttle_rejections_total", other) or 0.0
    limits = Limits(requests_per_minute=1)
    async with meter.admit("00000000000000aa", limits, unit="requests", stream=False):
        pass
    for _ in range(2):
        with pytest.raises(ResourceExhausted):
            async with meter.admit("00000000000000aa", limits, unit="requests", stream=False):
                pass
    assert _sample("mlmesh_throttle_rejections_total", labels) == before + 2
    assert (_sample("mlmesh_throttle_rejections_total", other) or 0.0) == before_other
    await sink.close()
    assert len(sink.written) == 1


async def test_flush_lag_grows_while_the_ledger_is_down_and_ends_when_written():
    sink = Gated()
    labels = {"sink": "gated-test"}
    assert _sample("mlmesh_usage_flush_lag_seconds", labels) == 0.0
    queued_at = time.monotonic()
    await sink.record(_event("c1"))
    await sink.record(_event("c2"))
    await asyncio.sleep(0.05)
    with pytest.raises(Unavailable):
        await sink.flush()
    lag = _sample("mlmesh_usage_flush_lag_seconds", labels)
    assert lag is not None and lag >= 0.05
    assert lag <= time.monotonic() - queued_at
    assert _sample("mlmesh_usage_events_pending", labels) == 2
    sink.up = True
    await sink.flush()
    assert [e.call_id for e in sink.written] == ["c1", "c2"]
    assert _sample("mlmesh_usage_flush_lag_seconds", labels) == 0.0
    assert _sample("mlmesh_usage_events_pending", labels) == 0
    await sink.close()

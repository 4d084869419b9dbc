"""The llm's engine load on /metrics (the SLO rules' queue depth and
saturation): read from the engines each scrape."""

from __future__ import annotations

import datetime as dt

from mlmesh_chassis.metrics import REGISTRY
from mlmesh_llm.engines.base import EngineRequest, Load, Sampling
from mlmesh_llm.engines.null import NullEngine
from mlmesh_llm.models import LoadedVersion
from mlmesh_llm.telemetry import export_engine_load


class Queued(NullEngine):
    """A null engine whose queue the test sets."""

    waiting = 0

    def load(self) -> Load:
        return Load(waiting=self.waiting, running=super().load().running, kv_cache_usage=0.25)


def _sample(name: str, version: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model": "metrics-llm", "version": version})


async def test_waiting_running_and_slots_follow_the_engine_and_leave_with_it():
    engine = Queued(token_seconds=0.001)
    loaded = [LoadedVersion("metrics-llm", 7, engine, dt.datetime.now(dt.UTC))]
    close = export_engine_load(lambda: loaded, slots=4)
    try:
        assert _sample("mlmesh_llm_requests_running", "7") == 0
        assert _sample("mlmesh_llm_batch_slots", "7") == 4
        stream = engine.generate(EngineRequest("r1", [1, 2], Sampling(max_tokens=5)))
        await anext(stream)  # mid-stream: one running
        engine.waiting = 3
        assert _sample("mlmesh_llm_requests_running", "7") == 1
        assert _sample("mlmesh_llm_requests_waiting", "7") == 3
        assert _sample("mlmesh_llm_kv_cache_usage", "7") == 0.25
        async for _ in stream:
            pass
        assert _sample("mlmesh_llm_requests_running", "7") == 0
        loaded.clear()  # unloaded: its series go
        assert _sample("mlmesh_llm_requests_running", "7") is None
    finally:
        await close()
    assert _sample("mlmesh_llm_batch_slots", "7") is None

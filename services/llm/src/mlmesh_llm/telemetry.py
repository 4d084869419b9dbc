"""The llm's engine load on /metrics, read at scrape time (nothing per
request): per loaded model version, the requests waiting and running and the
batch slots they share, which the SLO rules turn into queue depth and
saturation (running / slots)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator

from mlmesh_chassis.metrics import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mlmesh_llm.models import LoadedVersion


class EngineLoadCollector(Collector):
    """Gauges over ``loaded()`` (the manager's loaded versions) each scrape."""

    def __init__(self, loaded: Callable[[], Iterable[LoadedVersion]], slots: int) -> None:
        self.loaded = loaded
        self.slots = slots

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "version"]
        waiting = GaugeMetricFamily(
            "mlmesh_llm_requests_waiting", "Requests queued in the engine.", labels=labels
        )
        running = GaugeMetricFamily(
            "mlmesh_llm_requests_running", "Requests in the engine's batch.", labels=labels
        )
        slots = GaugeMetricFamily(
            "mlmesh_llm_batch_slots", "The engine's batch slots (max running).", labels=labels
        )
        kv_cache = GaugeMetricFamily(
            "mlmesh_llm_kv_cache_usage", "Share of the KV cache in use (0-1).", labels=labels
        )
        for version in list(self.loaded()):
            values = [version.model, str(version.version)]
            try:
                load = version.engine.load()
            except Exception:  # an engine stopping: no figures this scrape
                continue
            waiting.add_metric(values, load.waiting)
            running.add_metric(values, load.running)
            slots.add_metric(values, self.slots)
            kv_cache.add_metric(values, load.kv_cache_usage)
        yield from (waiting, running, slots, kv_cache)


def export_engine_load(
    loaded: Callable[[], Iterable[LoadedVersion]], slots: int
) -> Callable[[], Awaitable[None]]:
    """Registers the collector; returns what unregisters it (on close)."""
    collector = EngineLoadCollector(loaded, slots)
    REGISTRY.register(collector)

    async def unregister() -> None:
        REGISTRY.unregister(collector)

    return unregister

"""Triton's own figures on the deployer's /metrics, read at scrape time.

Triton in the mesh serves gRPC only (its HTTP metrics endpoint would need a
second fixed port, which Triton refuses to pick itself), so the deployer,
the service that keeps Triton's models live, asks Triton for its statistics
(the KServe v2 extension, ``ModelStatistics``) once per scrape, off the event
loop (the scrape runs on the metrics server's thread), and exports them as
counters per model and version: queue time (``rate(queue_seconds) /
rate(queued_requests)`` is the mean wait in Triton's scheduler), compute
time, successes and failures. ``mlmesh_triton_stats_up`` is 0 when Triton
did not answer within the timeout.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from mlmesh_chassis.metrics import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("mlmesh.deployer.telemetry")
LABELS = ["model", "version"]


class TritonStatsCollector(Collector):
    def __init__(self, target: str, timeout_s: float = 2.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._client: Any = None
        self._lock = threading.Lock()  # one scrape at a time per client

    def _statistics(self) -> Any:
        import tritonclient.grpc as grpcclient

        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.target)
        return self._client.get_inference_statistics(client_timeout=self.timeout_s)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "mlmesh_triton_stats_up", "Whether Triton answered for its statistics (1) or not (0)."
        )
        families = {
            "queue": CounterMetricFamily(
                "mlmesh_triton_queue_seconds",
                "Time requests waited in Triton's scheduler queue.",
                labels=LABELS,
            ),
            "queued": CounterMetricFamily(
                "mlmesh_triton_queued_requests", "Requests through Triton's queue.", labels=LABELS
            ),
            "compute": CounterMetricFamily(
                "mlmesh_triton_compute_seconds",
                "Time in the model's execute (compute_infer).",
                labels=LABELS,
            ),
            "success": CounterMetricFamily(
                "mlmesh_triton_requests_succeeded", "Requests Triton answered.", labels=LABELS
            ),
            "fail": CounterMetricFamily(
                "mlmesh_triton_requests_failed", "Requests Triton failed.", labels=LABELS
            ),
        }
        with self._lock:
            try:
                stats = self._statistics()
            except Exception as error:  # Triton down or slow: no figures this scrape
                log.debug("no statistics from Triton at %s: %s", self.target, error)
                up.add_metric([], 0)
                yield up
                return
        up.add_metric([], 1)
        for model in stats.model_stats:
            values = [model.name, model.version]
            inference = model.inference_stats
            families["queue"].add_metric(values, inference.queue.ns / 1e9)
            families["queued"].add_metric(values, inference.queue.count)
            families["compute"].add_metric(values, inference.compute_infer.ns / 1e9)
            families["success"].add_metric(values, inference.success.count)
            families["fail"].add_metric(values, inference.fail.count)
        yield up
        yield from families.values()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def export_triton_stats(target: str) -> Callable[[], Any]:
    """Registers the collector; returns the coroutine function that
    unregisters it and closes its channel (for ``host.on_close``)."""
    collector = TritonStatsCollector(target)
    REGISTRY.register(collector)

    async def unregister() -> None:
        REGISTRY.unregister(collector)
        collector.close()

    return unregister

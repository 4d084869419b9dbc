"""Latency-aware balancing of LLM requests across endpoints and regions.

Each endpoint's score is (requests in flight here + requests its engine
reports waiting + 1) x its decaying average time to first token. The caller's
region is preferred; when every endpoint there is saturated (reported
waiting, or in-flight at capacity) or ejected, requests spill over to the
best endpoint elsewhere, and come back when the region drains. An endpoint
that fails is ejected for a backoff that doubles with each failure in a row
(capped), then tried again. An endpoint that has not answered for a while
(because it was slow and so not picked) has its average halved every
``stale_half_life_s``, so it is tried again and can win traffic back once it
has recovered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
from mlmesh.llm.v1 import llm_service_pb2_grpc
from mlmesh_chassis.channels import MESSAGE_SIZE_OPTIONS

from mlmesh_gateway.upstreams import Credential, OpenAIStub, Upstream


@dataclass(eq=False)
class Endpoint:
    address: str
    region: str
    stub: Any = None
    channel: Any = None
    in_flight: int = 0
    waiting: int = 0
    running: int = 0
    ttft_ewma: float = 0.05
    observed_at: float = field(default_factory=time.monotonic)
    stale_half_life_s: float = 5.0
    failures: int = 0
    ejected_until: float = 0.0
    picks: int = 0

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.ejected_until

    def score(self) -> float:
        age = time.monotonic() - self.observed_at
        ttft = self.ttft_ewma * 0.5 ** (age / self.stale_half_life_s)
        return (self.in_flight + self.waiting + 1) * ttft


@dataclass
class LatencyAwareBalancer:
    endpoints: list[Endpoint]
    home_region: str = ""
    # An endpoint with this many requests in flight or waiting is saturated.
    saturation: int = 32
    alpha: float = 0.3
    max_step: float = 4.0
    eject_base_s: float = 1.0
    eject_max_s: float = 30.0
    _by_address: dict[str, Endpoint] = field(default_factory=dict)

    @classmethod
    def from_spec(
        cls, spec: str, home_region: str = "", saturation: int = 32
    ) -> LatencyAwareBalancer:
        """``region=host:port,region=host:port`` (region may be omitted)."""
        endpoints = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            region, _, address = part.rpartition("=")
            endpoint = Endpoint(address, region or "default")
            # No client interceptors: they wrap every streamed message (about
            # a seventh of the relay's CPU); calls pass trace context, request
            # id and deadline themselves (mlmesh_chassis.interceptors.propagation).
            endpoint.channel = grpc.aio.insecure_channel(address, options=MESSAGE_SIZE_OPTIONS)
            endpoint.stub = llm_service_pb2_grpc.LlmServiceStub(endpoint.channel)
            endpoints.append(endpoint)
        return cls(endpoints, home_region, saturation)

    @classmethod
    def for_upstream(
        cls,
        upstream: Upstream,
        session: aiohttp.ClientSession,
        home_region: str = "",
        saturation: int = 32,
    ) -> LatencyAwareBalancer:
        """An OpenAI-compatible model's endpoints, ranked like llm replicas."""
        credential = Credential(upstream.api_key_file)
        endpoints = []
        for region, url in upstream.endpoints:
            endpoint = Endpoint(url, region)
            endpoint.stub = OpenAIStub(url, upstream.upstream_model, credential, session)
            endpoints.append(endpoint)
        return cls(endpoints, home_region, saturation)

    def saturated(self, endpoint: Endpoint) -> bool:
        return endpoint.in_flight + endpoint.waiting >= self.saturation

    def candidates(self, region: str = "") -> list[Endpoint]:
        """Endpoints in the order to try: the region's unsaturated ones, best
        first; then other regions' unsaturated ones (spill-over); then the
        saturated ones; ejected ones last."""
        region = region or self.home_region
        healthy = [e for e in self.endpoints if e.healthy]
        open_ = [e for e in healthy if not self.saturated(e)]
        local = sorted((e for e in open_ if e.region == region), key=Endpoint.score)
        remote = sorted((e for e in open_ if e.region != region), key=Endpoint.score)
        saturated = sorted((e for e in healthy if self.saturated(e)), key=Endpoint.score)
        ejected = sorted(
            (e for e in self.endpoints if not e.healthy), key=lambda e: e.ejected_until
        )
        return [*local, *remote, *saturated, *ejected]

    def observe_first_token(self, endpoint: Endpoint, seconds: float) -> None:
        # One sample counts for at most max_step times the estimate: a single
        # stall (a GC pause, a busy core) can no longer make the fastest
        # endpoint look slowest for seconds; a real slowdown still takes over
        # within a few requests (each may nearly double the estimate).
        sample = min(seconds, endpoint.ttft_ewma * self.max_step)
        endpoint.ttft_ewma += self.alpha * (sample - endpoint.ttft_ewma)
        endpoint.observed_at = time.monotonic()
        endpoint.failures = 0

    def observe_load(self, endpoint: Endpoint, metadata: Any) -> None:
        values = dict(metadata or ())
        if "mlmesh-load-waiting" in values:
            endpoint.waiting = int(values["mlmesh-load-waiting"])
            endpoint.running = int(values.get("mlmesh-load-running", 0))

    def failed(self, endpoint: Endpoint, at_least_s: float = 0.0) -> None:
        """Ejects ``endpoint`` for its backoff, or for as long as it asked
        (an upstream's Retry-After, capped at ``eject_max_s``)."""
        endpoint.failures += 1
        backoff = min(self.eject_base_s * 2 ** (endpoint.failures - 1), self.eject_max_s)
        backoff = max(backoff, min(at_least_s, self.eject_max_s))
        endpoint.ejected_until = time.monotonic() + backoff

    async def close(self) -> None:
        for endpoint in self.endpoints:
            if endpoint.channel is not None:
                await endpoint.channel.close()

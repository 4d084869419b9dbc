"""The gateway's relay and balancer against in-process LLM endpoints.

The endpoints are test doubles of LlmService (a delay before the first
token, a failure before or during the stream), so each routing rule can be
driven exactly; the gateway code under test is the real one, on a real
server, with a real key store, throttle and ledger (SQLite).
"""

from __future__ import annotations

import asyncio
import collections
from typing import ClassVar

import grpc
import pytest
import sqlalchemy as sa
from keyring import Keyring, migrated_gateway_db
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc
from mlmesh.llm.v1 import llm_pb2, llm_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_chassis.config import ServiceSettings
from mlmesh_chassis.testing import expect_error
from mlmesh_gateway.balancer import Endpoint, LatencyAwareBalancer
from mlmesh_gateway.servicer import GatewayServicer
from mlmesh_metering import Metering, Throttle
from mlmesh_metering.ledger import UsageLedger, usage_events
from mlmesh_sdk.channel import mesh_channel

MODEL = model_reference_pb2.ModelReference(model="tiny-llama", alias="champion")


class Settings(ServiceSettings):
    service_name: ClassVar[str] = "routing-test"


class FakeLlm(llm_service_pb2_grpc.LlmServiceServicer):
    """An LLM endpoint with a controllable first-token delay and failures."""

    def __init__(self, name: str, delay: float = 0.002) -> None:
        self.name = name
        self.delay = delay
        self.fail_before_first = False
        self.fail_after: int | None = None
        self.calls = 0
        # Versions it has loaded (None: any); a pinned other one is NOT_FOUND.
        self.loaded_versions: set[int] | None = None
        self.asked_versions: list[int] = []  # what each Generate pinned (0: none)

    async def _check_loaded(self, request, context) -> None:
        version = request.model.version if request.model.WhichOneof("selector") == "version" else 0
        if version and self.loaded_versions is not None and version not in self.loaded_versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"version {version} is not loaded")

    async def GetModel(self, request, context):
        await self._check_loaded(request, context)
        return llm_rpc.GetModelResponse()

    async def CountTokens(self, request, context):
        await self._check_loaded(request, context)
        return llm_rpc.CountTokensResponse(
            token_count=len(request.text.split()), context_length=1024
        )

    async def Generate(self, request, context):
        self.calls += 1
        await self._check_loaded(request, context)
        pinned = request.model.WhichOneof("selector") == "version"
        self.asked_versions.append(request.model.version if pinned else 0)
        if self.fail_before_first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is down")
        await asyncio.sleep(self.delay)
        total = request.sampling.max_tokens
        for i in range(total):
            if self.fail_after is not None and i == self.fail_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} died")
            last = i == total - 1
            chunk = llm_rpc.GenerateResponse(text="x", token_count=1)
            if i == 0:
                chunk.model.CopyFrom(
                    model_reference_pb2.ModelReference(
                        model="tiny-llama", version=request.model.version if pinned else 1
                    )
                )
            if last:
                chunk.finish_reason = llm_pb2.FINISH_REASON_LENGTH
                chunk.usage.prompt_tokens = len(request.text.split())
                chunk.usage.completion_tokens = total
            yield chunk
            await asyncio.sleep(0)
        context.set_trailing_metadata((("mlmesh-load-waiting", "0"), ("mlmesh-load-running", "1")))


@pytest.fixture
async def mesh(tmp_path):
    """Two regions: a (home) with endpoints a1, a2; b with b1."""
    fakes = {name: FakeLlm(name) for name in ("a1", "a2", "b1")}
    database = await migrated_gateway_db(f"sqlite+aiosqlite:///{tmp_path}/g.db")
    keys = await Keyring.open(database, tmp_path)
    hosts, spec = [], []
    for name, fake in fakes.items():
        host, port = await keys.serve(fake, llm_service_pb2_grpc.add_LlmServiceServicer_to_server)
        hosts.append(host)
        spec.append(f"{name[0]}=127.0.0.1:{port}")
    _, secret = await keys.create(pb.Key(display_name="t"))
    balancer = LatencyAwareBalancer.from_spec(",".join(spec), home_region="a", saturation=2)
    throttle = Throttle()
    ledger = UsageLedger(database)
    meter = Metering(throttle, ledger, pb.PLATFORM_SERVICE_GENERATE)
    gateway = GatewayServicer(meter, balancer, None, ["tiny-llama"], [], [])
    host, port = await keys.serve(
        gateway, gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server
    )
    hosts.append(host)
    by_address = {e.address: e for e in balancer.endpoints}
    endpoints = {name: by_address[s.split("=")[1]] for name, s in zip(fakes, spec, strict=True)}
    async with mesh_channel(f"127.0.0.1:{port}", secret) as channel:
        yield (
            gateway_service_pb2_grpc.GatewayServiceStub(channel),
            fakes,
            endpoints,
            ledger,
            throttle,
        )
    await ledger.close()
    await balancer.close()
    for h in hosts:
        await h.shutdown()
    await keys.close()
    await database.close()


def request(tokens: int = 5, request_id: str = "") -> rpc.GenerateRequest:
    return rpc.GenerateRequest(
        region="a",
        request=llm_rpc.GenerateRequest(
            model=MODEL,
            text="one two three",
            request_id=request_id,
            sampling=llm_pb2.SamplingParams(max_tokens=tokens),
        ),
    )


async def run(stub, **kwargs) -> list[rpc.GenerateResponse]:
    return [chunk async for chunk in stub.Generate(request(**kwargs))]


async def test_a_slow_endpoint_loses_its_traffic_within_two_seconds(mesh):
    stub, fakes, _endpoints, _db, _ = mesh
    fakes["a2"].delay = 0.1  # 50x slower to first token than a1
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < 2.0:  # the balancer learns for at most 2 s
        await asyncio.gather(*(run(stub) for _ in range(2)))
    regions = collections.Counter()
    for _ in range(20):
        chunks = await run(stub)
        regions[chunks[0].region] += 1
    before = dict(calls=fakes["a1"].calls, slow=fakes["a2"].calls)
    for _ in range(20):
        await run(stub)
    fast = fakes["a1"].calls - before["calls"]
    assert fast >= 18, f"only {fast} of 20 went to the fast endpoint"
    assert regions["a"] == 20  # the home region is not saturated: no spill


async def test_a_saturated_region_spills_over_and_comes_back(mesh):
    stub, fakes, _endpoints, _db, _ = mesh
    for name in ("a1", "a2"):
        fakes[name].delay = 0.5  # long first token: requests pile up in region a
    hold = [asyncio.ensure_future(run(stub)) for _ in range(4)]  # 2 per endpoint: saturated
    await asyncio.sleep(0.1)
    spilled = await run(stub)
    assert spilled[0].region == "b"
    await asyncio.gather(*hold)
    for name in ("a1", "a2"):
        fakes[name].delay = 0.002
    back = await run(stub)
    assert back[0].region == "a"


async def test_a_failure_before_the_first_token_is_retried_elsewhere(mesh):
    stub, fakes, endpoints, ledger, _ = mesh
    fakes["a1"].fail_before_first = True
    endpoints["a1"].ttft_ewma = 0.001  # make sure the dead one is tried first
    chunks = await run(stub, request_id="retry-1")
    assert sum(c.response.token_count for c in chunks) == 5
    assert fakes["a1"].calls == 1 and not endpoints["a1"].healthy  # ejected
    await ledger.flush()
    async with ledger.db.read() as c:
        rows = (
            await c.execute(sa.select(usage_events).where(usage_events.c.request_id == "retry-1"))
        ).all()
    assert [(r.completion_tokens, r.status) for r in rows] == [(5, "OK")]


async def test_a_failure_mid_stream_is_unavailable_and_billed_once(mesh):
    stub, fakes, _endpoints, ledger, throttle = mesh
    for name in ("a1", "a2", "b1"):
        fakes[name].fail_after = 3
    details = await expect_error(
        run(stub, tokens=10, request_id="mid-1"), grpc.StatusCode.UNAVAILABLE
    )
    assert "died" in details.message
    assert sum(f.calls for f in fakes.values()) == 1  # no retry after tokens were sent
    await ledger.flush()
    async with ledger.db.read() as c:
        rows = (
            await c.execute(sa.select(usage_events).where(usage_events.c.request_id == "mid-1"))
        ).all()
    assert [(r.prompt_tokens, r.completion_tokens, r.status) for r in rows] == [
        (3, 3, "UNAVAILABLE")
    ]
    # the reservation (3 + 10) was settled to what was used (3 + 3)
    key_subject = next(iter(throttle.local._tokens))
    assert await throttle.local.used(key_subject) == 6


def test_one_stall_does_not_flip_the_ranking_but_a_slowdown_does():
    balancer = LatencyAwareBalancer([Endpoint("fast", "a"), Endpoint("slow", "a")], "a")
    fast, slow = balancer.endpoints
    for _ in range(20):
        balancer.observe_first_token(fast, 0.002)
        balancer.observe_first_token(slow, 0.1)
    balancer.observe_first_token(fast, 2.0)  # one stall, 1000x its usual
    assert balancer.candidates()[0] is fast
    for _ in range(8):  # a real slowdown: it keeps being slow
        balancer.observe_first_token(fast, 2.0)
    assert balancer.candidates()[0] is slow

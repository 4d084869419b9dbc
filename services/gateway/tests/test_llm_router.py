"""LlmRouter against scripted endpoints: retries before the first token,
ejection, in-flight counts, and the fallback for an arm's missing version."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_chassis.errors import Unavailable
from mlmesh_gateway.balancer import Endpoint, LatencyAwareBalancer
from mlmesh_gateway.llm_router import LlmRouter

ALIAS = ModelReference(model="tiny-llama", alias="champion")
PINNED = ModelReference(model="tiny-llama", version=9)


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name


class Call:
    """A streaming call: ``chunks`` texts, then ``fail`` (if any)."""

    def __init__(self, chunks: list[str], fail: grpc.StatusCode | None, gate=None) -> None:
        self.chunks, self.fail, self.gate = chunks, fail, gate
        self.cancelled = False

    async def __aiter__(self):
        for text in self.chunks:
            if self.gate is not None:
                await self.gate.wait()
            yield llm_rpc.GenerateResponse(text=text, token_count=1)
        if self.fail is not None:
            raise Failure(self.fail)

    async def trailing_metadata(self):
        return (("mlmesh-load-waiting", "0"),)

    def cancel(self) -> None:
        self.cancelled = True


class Stub:
    """One endpoint's LlmService: what each Generate does, in order."""

    def __init__(self, *script: tuple[list[str], grpc.StatusCode | None]) -> None:
        self.script = list(script)
        self.asked: list[ModelReference] = []
        self.count_fails: list[grpc.StatusCode] = []
        self.gate: asyncio.Event | None = None
        self.called = asyncio.Event()  # set once a Generate reached this endpoint

    def Generate(self, request, metadata=None, timeout=None) -> Call:
        self.called.set()
        self.asked.append(ModelReference.FromString(request.model.SerializeToString()))
        chunks, fail = self.script.pop(0) if self.script else (["ok"], None)
        return Call(chunks, fail, self.gate)

    async def CountTokens(self, request, **_call_options):
        self.asked.append(ModelReference.FromString(request.model.SerializeToString()))
        if self.count_fails:
            raise Failure(self.count_fails.pop(0))
        return llm_rpc.CountTokensResponse(token_count=len(request.text.split()))


def router(*stubs: Stub) -> tuple[LlmRouter, list[Endpoint]]:
    endpoints = [Endpoint(f"e{i}", "a", stub=s) for i, s in enumerate(stubs)]
    for i, endpoint in enumerate(endpoints):
        endpoint.ttft_ewma = 0.01 * (i + 1)  # ranked in the order given
    return LlmRouter(LatencyAwareBalancer(endpoints, "a")), endpoints


def generate(model: ModelReference = ALIAS) -> llm_rpc.GenerateRequest:
    return llm_rpc.GenerateRequest(model=model, text="one two three")


async def texts(route: LlmRouter, request, fallback=None) -> list[tuple[str, str]]:
    return [(e.address, c.text) async for e, c in route.stream("a", request, fallback)]


async def test_a_failure_before_the_first_token_is_retried_on_the_next_endpoint():
    first, second = Stub(([], grpc.StatusCode.UNAVAILABLE)), Stub()
    route, (e0, e1) = router(first, second)
    assert await texts(route, generate()) == [("e1", "ok")]
    assert not e0.healthy and e0.failures == 1  # ejected
    assert e1.healthy and e0.in_flight == e1.in_flight == 0


async def test_a_failure_after_the_first_token_is_not_retried():
    first, second = Stub((["a", "b"], grpc.StatusCode.UNAVAILABLE)), Stub()
    route, (e0, _) = router(first, second)
    with pytest.raises(Failure):
        await texts(route, generate())
    assert second.asked == []  # nothing retried: text was sent
    assert not e0.healthy and e0.in_flight == 0


async def test_other_errors_go_back_as_they_are_without_ejection():
    route, (e0, _) = router(Stub(([], grpc.StatusCode.INVALID_ARGUMENT)), Stub())
    with pytest.raises(Failure) as error:
        await texts(route, generate())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e0.healthy


async def test_every_endpoint_failing_is_unavailable_after_the_attempts():
    down = [Stub(([], grpc.StatusCode.UNAVAILABLE)) for _ in range(4)]
    route, endpoints = router(*down)
    with pytest.raises(Failure):
        await texts(route, generate())
    assert [len(s.asked) for s in down] == [1, 1, 1, 0]  # three attempts
    assert sum(not e.healthy for e in endpoints) == 3


async def test_requests_in_flight_are_counted_and_ranked_by():
    first, second = Stub(), Stub()
    route, (e0, e1) = router(first, second)
    # e0 is faster, but not twice as fast: one stream in flight ranks it behind
    # e1 (with 0.01 s against 0.02 s the two scores tie, (1 + 1) * 0.01 = 0.02,
    # and which one wins turns on the instants each was created at).
    e1.ttft_ewma = 0.015
    first.gate = asyncio.Event()  # the first stream holds e0
    held = asyncio.ensure_future(texts(route, generate()))
    async with asyncio.timeout(5):
        await first.called.wait()  # the held stream is on e0
    assert e0.in_flight == 1
    async with asyncio.timeout(5):  # e0 is busy: e1 ranks first (not a wait on e0's gate)
        assert await texts(route, generate()) == [("e1", "ok")]
    first.gate.set()
    assert await held == [("e0", "ok")]
    assert e0.in_flight == e1.in_flight == 0


async def test_an_endpoint_without_the_arms_version_serves_the_fallback():
    stub = Stub(([], grpc.StatusCode.NOT_FOUND))
    route, (e0,) = router(stub)
    request = generate(PINNED)
    assert await texts(route, request, fallback=ALIAS) == [("e0", "ok")]
    assert stub.asked == [PINNED, ALIAS] and request.model == ALIAS  # unpinned
    assert e0.healthy


async def test_counting_tokens_retries_unavailable_and_unpins_on_not_found():
    first, second = Stub(), Stub()
    first.count_fails = [grpc.StatusCode.UNAVAILABLE]
    second.count_fails = [grpc.StatusCode.NOT_FOUND]
    route, (e0, _) = router(first, second)
    request = generate(PINNED)
    assert await route.count_tokens("a", request, ALIAS) == 3
    assert second.asked == [PINNED, ALIAS] and request.model == ALIAS
    assert not e0.healthy


async def test_no_endpoint_configured_is_unavailable():
    with pytest.raises(Unavailable):
        await texts(LlmRouter(LatencyAwareBalancer([])), generate())

"""LlmRouter: every call the gateway makes to an LLM endpoint, routed.

The balancer (``balancer.py``) ranks endpoints; the router walks that
ranking. Before anything was sent to the caller, an endpoint that fails with
UNAVAILABLE is ejected (its backoff doubles) and the next one tried, up to
``attempts`` endpoints; after the first token, a failure goes back to the
caller as it is (no retry: text was sent). Requests in flight are counted per
endpoint with no await between ranking and counting, so concurrent requests
see each other.

Endpoints are llm replicas (gRPC) or OpenAI-compatible servers
(``upstreams.OpenAIStub``, which raises domain errors instead of gRPC
ones): an upstream's 429 is retryable like UNAVAILABLE, and ejects the
endpoint for at least its Retry-After.

A request pinned to an experiment arm's version carries the reference as
the caller asked (``fallback``): an endpoint that has not loaded that version
(NOT_FOUND) serves the fallback instead, and the request is unpinned.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_chassis.errors import MlmeshError, Unavailable
from mlmesh_chassis.interceptors import propagation

from mlmesh_gateway.balancer import Endpoint, LatencyAwareBalancer
from mlmesh_gateway.telemetry import BACKEND_PICKS, annotate
from mlmesh_gateway.upstreams import OpenAIStub

RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
# An OpenAI-compatible upstream's 429 is its own rate limit: another endpoint
# may have room.
RETRYABLE_UPSTREAM = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
Failure = (grpc.RpcError, MlmeshError)


def _code(error: grpc.RpcError | MlmeshError) -> grpc.StatusCode:
    if isinstance(error, MlmeshError):
        return error.code
    return error.code()  # type: ignore[attr-defined,no-any-return]


def _retryable(error: grpc.RpcError | MlmeshError) -> bool:
    if isinstance(error, MlmeshError):
        return error.code in RETRYABLE_UPSTREAM
    return _code(error) in RETRYABLE


def _wait(error: grpc.RpcError | MlmeshError) -> float:
    """How long the endpoint asked not to be called (an upstream's Retry-After)."""
    return float(getattr(error, "retry_after_s", 0.0)) if isinstance(error, MlmeshError) else 0.0


def unpin(request: llm_rpc.GenerateRequest, fallback: ModelReference) -> None:
    """Serves the reference as the caller asked instead of an arm's version
    the endpoint has not loaded (said on the span)."""
    request.model.CopyFrom(fallback)
    annotate(**{"mlmesh.experiment.arm_loaded": False})


class LlmRouter:
    def __init__(self, balancer: LatencyAwareBalancer, attempts: int = 3) -> None:
        self.balancer = balancer
        self.attempts = attempts

    def _candidates(self, region: str) -> list[Endpoint]:
        candidates = self.balancer.candidates(region)
        if not candidates:
            raise Unavailable("no LLM endpoint is configured", retry_after_s=5.0)
        return candidates

    async def count_tokens(
        self, region: str, request: llm_rpc.GenerateRequest, fallback: ModelReference | None
    ) -> int:
        """The prompt's tokens, as the model counts them (unpins ``request``
        when the endpoint lacks its pinned version)."""
        counted = llm_rpc.CountTokensRequest(model=request.model)
        if request.WhichOneof("prompt") == "chat":
            counted.chat.CopyFrom(request.chat)
        else:
            counted.text = request.text
        last: grpc.RpcError | None = None
        for endpoint in self._candidates(region)[: self.attempts]:
            metadata, timeout = propagation(10.0)
            try:
                try:
                    reply = await endpoint.stub.CountTokens(
                        counted, metadata=metadata, timeout=timeout
                    )
                except grpc.RpcError as error:
                    if fallback is None or _code(error) != grpc.StatusCode.NOT_FOUND:
                        raise
                    unpin(request, fallback)
                    counted.model.CopyFrom(fallback)
                    fallback = None
                    reply = await endpoint.stub.CountTokens(
                        counted, metadata=metadata, timeout=timeout
                    )
                return int(reply.token_count)
            except grpc.RpcError as error:
                if _code(error) not in RETRYABLE:
                    raise
                self.balancer.failed(endpoint)
                last = error
        assert last is not None
        raise last

    async def stream(
        self,
        region: str,
        request: llm_rpc.GenerateRequest,
        fallback: ModelReference | None,
        whole: bool = False,
    ) -> AsyncIterator[tuple[Endpoint, llm_rpc.GenerateResponse]]:
        """The generation's chunks, each with the endpoint that serves them
        (``whole``: the caller wants only the whole answer, which an
        OpenAI-compatible upstream then sends as one response)."""
        started = time.monotonic()
        tried: set[int] = set()
        last: grpc.RpcError | MlmeshError | None = None
        for attempt in range(self.attempts):
            remaining = [e for e in self._candidates(region) if id(e) not in tried]
            if not remaining:
                break
            endpoint = remaining[0]
            tried.add(id(endpoint))
            endpoint.in_flight += 1
            endpoint.picks += 1
            BACKEND_PICKS.labels(endpoint.address, endpoint.region).inc()
            metadata, timeout = propagation()
            if whole and isinstance(endpoint.stub, OpenAIStub):
                call = endpoint.stub.Generate(request, metadata, timeout, whole=True)
            else:
                call = endpoint.stub.Generate(request, metadata=metadata, timeout=timeout)
            first = True
            try:
                async for chunk in call:
                    if first:
                        self.balancer.observe_first_token(endpoint, time.monotonic() - started)
                        first = False
                    yield endpoint, chunk
                self.balancer.observe_load(endpoint, await call.trailing_metadata())
                return
            except Failure as error:
                code = _code(error)
                if first and fallback is not None and code == grpc.StatusCode.NOT_FOUND:
                    unpin(request, fallback)  # this endpoint lacks the arm's version
                    fallback = None
                    tried.discard(id(endpoint))
                    continue
                if _retryable(error):
                    self.balancer.failed(endpoint, _wait(error))
                    if first and attempt < self.attempts - 1:
                        last = error
                        continue  # nothing was sent yet: try elsewhere
                raise
            finally:
                endpoint.in_flight -= 1
                call.cancel()
        if last is not None:  # every endpoint tried failed: the last one's reason
            raise last
        raise Unavailable("no LLM endpoint could take the request", retry_after_s=1.0)

    async def complete(self, request: llm_rpc.GenerateRequest) -> str:
        """The whole text of a generation off any caller's path (shadows)."""
        return "".join([chunk.text async for _, chunk in self.stream("", request, None)])

    async def has_loaded(self, model: str, version: int) -> bool:
        """Whether the best endpoint serves ``model``/``version`` now."""
        candidates = self.balancer.candidates()
        if not candidates:
            return False
        metadata, timeout = propagation(2.0)
        try:
            await candidates[0].stub.GetModel(
                llm_rpc.GetModelRequest(model=ModelReference(model=model, version=version)),
                metadata=metadata,
                timeout=timeout,
            )
        except grpc.RpcError:
            return False
        return True

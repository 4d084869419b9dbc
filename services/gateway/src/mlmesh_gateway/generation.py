"""One generation, whoever asked: the gRPC Generate and the OpenAI surface's
chat and text completions share this path.

1. the key may use the model (``authorize``); the prompt's size is bounded;
2. the backend: the llm service's replicas, or the model's OpenAI-compatible
   upstream (``upstreams.py``), each a balanced ``LlmRouter``;
3. the version (llm models only): the reference as asked, or an A/B arm
   (``traffic_split``);
4. the prompt's tokens, counted here with the version's own tokenizer
   (``prompt_tokens``); while it is not held, the llm's CountTokens (llm) or
   a byte bound (upstream);
5. admission reserves prompt + max_tokens (``admission``) and settles to
   what was used: the backend's reported usage where it reports one, the
   relayed chunks otherwise (an upstream without usage: its text counted
   with the tokenizer);
6. the chunks are relayed; after a finished llm generation, an experiment's
   shadow is mirrored (``shadows``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import json_format
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_chassis.auth import authorize
from mlmesh_chassis.errors import MlmeshError
from mlmesh_chassis.generation import check_prompt_size, max_tokens_of
from mlmesh_metering import MeteredCall

from mlmesh_gateway.admission import Admission
from mlmesh_gateway.balancer import Endpoint
from mlmesh_gateway.directory import ModelDirectory
from mlmesh_gateway.llm_router import LlmRouter
from mlmesh_gateway.prediction_log import GENERATE, PredictionLog
from mlmesh_gateway.prompt_tokens import PromptTokens, byte_bound
from mlmesh_gateway.shadows import ShadowComparison, ShadowRunner
from mlmesh_gateway.telemetry import TIME_TO_FIRST_TOKEN, annotate
from mlmesh_gateway.traffic_split import Split, TrafficSplit
from mlmesh_gateway.upstreams import Upstream

log = logging.getLogger("mlmesh.gateway")
ModelReference = model_reference_pb2.ModelReference


@dataclass
class Outcome:
    """What a finished generation used (filled in as it ends)."""

    call_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    version: int = 0
    region: str = ""


class Generation:
    def __init__(
        self,
        admission: Admission,
        router: LlmRouter,
        upstreams: Mapping[str, tuple[Upstream, LlmRouter]],
        split: TrafficSplit,
        shadows: ShadowRunner,
        directory: ModelDirectory | None,
        tokens: PromptTokens | None,
        predictions: PredictionLog | None = None,
    ) -> None:
        self.admission = admission
        self.predictions = predictions or PredictionLog(None)
        self.router = router
        self.upstreams = dict(upstreams)
        self.split = split
        self.shadows = shadows
        self.directory = directory
        self.tokens = tokens

    async def stream(
        self,
        key: pb.Key,
        inner: llm_rpc.GenerateRequest,
        region: str,
        headers: Mapping[str, str],
        *,
        prefix: str = "",
        outcome: Outcome | None = None,
        operation: str = "text_completion",
        whole: bool = False,
    ) -> AsyncIterator[tuple[Endpoint, llm_rpc.GenerateResponse]]:
        """The generation's chunks, each with the endpoint serving them;
        ``inner`` is the caller's request (this call may change it);
        ``whole``: the caller waits for the whole answer."""
        model = inner.model.model
        authorize(key, pb.PLATFORM_SERVICE_GENERATE, model)
        check_prompt_size(inner, prefix)
        upstream = self.upstreams.get(model)
        if upstream is not None:
            spec, router = upstream
            split, fallback = Split(), None
            counted = await self._count_upstream(spec, inner)
        else:
            router = self.router
            asked = ModelReference()
            asked.CopyFrom(inner.model)
            split = await self.split.route(asked, key.id, headers)
            if split.version:
                inner.model.CopyFrom(ModelReference(model=model, version=split.version))
            # An arm's version an endpoint has not loaded: served as asked instead.
            fallback = asked if split.experiment is not None else None
            counted = await self._count_llm(inner, region, fallback)
        max_tokens = max_tokens_of(inner.sampling)
        async with (
            self.admission(
                key,
                pb.PLATFORM_SERVICE_GENERATE,
                model,
                reserve=counted + max(max_tokens, 0),
                request_id=inner.request_id,
            ) as call,
            self.predictions.observe(GENERATE, model, call, inner) as seen,
        ):
            annotate(
                **{
                    "gen_ai.system": "openai" if upstream is not None else "mlmesh",
                    "gen_ai.operation.name": operation,
                    "gen_ai.request.model": model,
                    "gen_ai.request.max_tokens": max_tokens,
                }
            )
            # The engine's id: unique per call (the caller's stays beside it
            # in the usage event, for tracing only).
            inner.request_id = call.call_id
            call.prompt_tokens = counted
            if outcome is not None:
                outcome.call_id = call.call_id
            started = time.monotonic()
            text: list[str] = []
            seen.text = text  # joined off the request path, if sampled
            reported_completion = False
            async for endpoint, chunk in router.stream(region, inner, fallback, whole):
                if not text and not call.region:
                    call.region = endpoint.region
                if call.completion_tokens == 0 and chunk.token_count:
                    TIME_TO_FIRST_TOKEN.labels(model).observe(time.monotonic() - started)
                call.completion_tokens += chunk.token_count
                text.append(chunk.text)
                if chunk.HasField("model"):
                    call.version = chunk.model.version
                if chunk.HasField("usage"):
                    if chunk.usage.prompt_tokens:
                        call.prompt_tokens = int(chunk.usage.prompt_tokens)
                    if chunk.usage.completion_tokens:
                        call.completion_tokens = int(chunk.usage.completion_tokens)
                        reported_completion = True
                yield endpoint, chunk
            if upstream is not None and not reported_completion:
                await self._recount_completion(upstream[0], call, "".join(text))
            if outcome is not None:
                outcome.prompt_tokens = call.prompt_tokens
                outcome.completion_tokens = call.completion_tokens
                outcome.version = call.version
                outcome.region = call.region
            still_pinned = inner.model.WhichOneof("selector") == "version"
            if split.shadow and still_pinned and split.shadow != call.version:
                self._shadow(split, inner, call, "".join(text))

    # ---- prompt tokens --------------------------------------------------------

    async def _version(self, reference: ModelReference) -> int:
        """The version a reference serves now, from the followed registry (0: unknown)."""
        if reference.WhichOneof("selector") == "version":
            return int(reference.version)
        if self.directory is None:
            return 0
        alias = reference.alias if reference.WhichOneof("selector") == "alias" else ""
        try:
            return int((await self.directory.served(reference.model, alias)).served.version)
        except (MlmeshError, grpc.RpcError, OSError) as error:
            log.debug("no served version for %s: %s", reference.model, error)
            return 0

    async def _count_llm(
        self, inner: llm_rpc.GenerateRequest, region: str, fallback: ModelReference | None
    ) -> int:
        if self.tokens is not None:
            version = await self._version(inner.model)
            counted = await self.tokens.count(inner.model.model, version, inner)
            if counted is not None:
                return counted
        # The tokenizer is not held (yet): the llm counts.
        return await self.router.count_tokens(region, inner, fallback)

    async def _count_upstream(self, spec: Upstream, inner: llm_rpc.GenerateRequest) -> int:
        if spec.tokenizer and self.tokens is not None:
            version = await self._version(ModelReference(model=spec.tokenizer))
            counted = await self.tokens.count(spec.tokenizer, version, inner)
            if counted is not None:
                return counted
        return byte_bound(inner)

    async def _recount_completion(self, spec: Upstream, call: MeteredCall, text: str) -> None:
        """An upstream that reported no usage: its text counted with the
        tokenizer (when held; the relayed chunks' count otherwise)."""
        if not spec.tokenizer or self.tokens is None or not text:
            return
        version = await self._version(ModelReference(model=spec.tokenizer))
        counted = await self.tokens.count_text(spec.tokenizer, version, text)
        if counted is not None:
            call.completion_tokens = counted

    # ---- shadows --------------------------------------------------------------

    def _shadow(
        self, split: Split, inner: llm_rpc.GenerateRequest, call: MeteredCall, text: str
    ) -> None:
        """Mirrors a finished generation to the shadow version (same seed and
        settings): the texts agree or not."""
        assert split.experiment is not None
        mirrored = llm_rpc.GenerateRequest()
        mirrored.CopyFrom(inner)
        mirrored.model.CopyFrom(ModelReference(model=inner.model.model, version=split.shadow))
        mirrored.request_id = f"{call.call_id}-shadow"

        async def difference() -> ShadowComparison:
            shadow_text = await self.router.complete(mirrored)
            if shadow_text == text:
                return ShadowComparison(0.0)
            prompt = (
                inner.text
                if inner.WhichOneof("prompt") == "text"
                else json_format.MessageToJson(inner.chat)
            )
            return ShadowComparison(1.0, "generate", prompt, text, shadow_text)

        versions = (call.version, split.shadow)
        self.shadows.mirror(call.call_id, split.experiment, call.model, versions, difference)

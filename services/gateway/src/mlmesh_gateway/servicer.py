"""GatewayService: one API for every model.

Each handler turns the request into domain calls and the answer back:
the caller's key is checked (``authorize``) and its tensors (``tensors``; the
chassis has checked every field against the contract's rules), the call
admitted and metered (``admission``), the version chosen (``traffic_split``),
the backend called (``generation`` for Generate: the llm or an
OpenAI-compatible upstream; ``triton_router`` for Infer and Embed) and
shadows mirrored (``shadows``). The OpenAI surface (``openai_http``) calls
the same ``generation`` and ``embed``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from mlmesh.common.v1 import model_reference_pb2, usage_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc
from mlmesh_chassis.auth import authorize, current_principal
from mlmesh_chassis.pagination import offset_page
from mlmesh_inference.triton import TritonClient
from mlmesh_metering import Metering

from mlmesh_gateway.admission import Admission
from mlmesh_gateway.balancer import LatencyAwareBalancer
from mlmesh_gateway.catalog import Catalog
from mlmesh_gateway.directory import ModelDirectory
from mlmesh_gateway.embeddings import embedding_inputs, prompt_tokens_of, vectors_of
from mlmesh_gateway.generate_messages import to_gateway, to_llm, uses_deprecated_request
from mlmesh_gateway.generation import Generation, Outcome
from mlmesh_gateway.llm_router import LlmRouter
from mlmesh_gateway.prediction_log import EMBED, INFER, PredictionLog
from mlmesh_gateway.prompt_tokens import PromptTokens
from mlmesh_gateway.shadows import ShadowLog, ShadowRunner
from mlmesh_gateway.tensors import inputs_of, outputs_of, sent_typed, triton_parameters
from mlmesh_gateway.traffic_split import TrafficSplit
from mlmesh_gateway.triton_router import TritonRouter
from mlmesh_gateway.upstreams import Upstream

ModelReference = model_reference_pb2.ModelReference


@dataclass(frozen=True)
class Embedded:
    """An Embed call's result: Triton's outputs, the version, the tokens billed."""

    outputs: Any
    version: int
    prompt_tokens: int


def _headers(context: grpc.aio.ServicerContext) -> Mapping[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


class GatewayServicer(gateway_service_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        meter: Metering,
        llm: LatencyAwareBalancer,
        triton: TritonClient | None,
        llm_models: list[str],
        classic_models: list[str],
        embedding_models: list[str],
        directory: ModelDirectory | None = None,
        shadows: ShadowLog | None = None,
        upstreams: Mapping[str, tuple[Upstream, LatencyAwareBalancer]] | None = None,
        tokens: PromptTokens | None = None,
        predictions: PredictionLog | None = None,
    ) -> None:
        self.admission = Admission(meter)
        # Sampled calls for the monitor (off unless a monitor is configured).
        self.predictions = predictions or PredictionLog(None)
        self.router = LlmRouter(llm)
        self.shadows = ShadowRunner(shadows)
        self.llm_split = TrafficSplit(directory, self.router.has_loaded, pin_served=False)
        self.triton = TritonRouter(triton, directory, self.shadows)
        routed = {
            name: (spec, LlmRouter(balancer))
            for name, (spec, balancer) in (upstreams or {}).items()
        }
        self.generation = Generation(
            self.admission,
            self.router,
            routed,
            self.llm_split,
            self.shadows,
            directory,
            tokens,
            self.predictions,
        )
        self.catalog = Catalog(
            llm, routed, llm_models, classic_models, embedding_models, llm.home_region
        )

    async def Generate(self, request, context) -> AsyncIterator[rpc.GenerateResponse]:  # type: ignore[no-untyped-def,override]
        key = current_principal().key
        deprecated = uses_deprecated_request(request)
        inner = to_llm(request)  # the gateway's own message, or the deprecated llm one
        first = True
        outcome = Outcome()
        stream = self.generation.stream(
            key,
            inner,
            request.region,
            _headers(context),
            prefix="request." if deprecated else "",
            outcome=outcome,
        )
        async for endpoint, chunk in stream:
            if first:  # say which backend serves the stream, and the call's id
                first = False
                await context.send_initial_metadata(
                    (
                        ("x-mlmesh-backend", endpoint.address),
                        ("x-mlmesh-region", endpoint.region),
                        ("x-mlmesh-call-id", outcome.call_id),
                    )
                )
            yield to_gateway(chunk, endpoint.region, deprecated=deprecated)

    async def Infer(self, request, context):  # type: ignore[no-untyped-def]
        key = current_principal().key
        model = request.model.model
        authorize(key, pb.PLATFORM_SERVICE_INFER, model)
        self.triton.client()
        inputs = await inputs_of(request)
        parameters = triton_parameters(request.parameters)
        async with (
            self.admission(key, pb.PLATFORM_SERVICE_INFER, model, request_id=request.id) as call,
            self.predictions.observe(INFER, model, call, request) as seen,
        ):
            context.set_trailing_metadata((("x-mlmesh-call-id", call.call_id),))
            seen.inputs = inputs
            call.input_items = int(sum(array.size for array in inputs.values()))
            result = await self.triton.infer(
                request.model,
                key.id,
                _headers(context),
                call,
                inputs,
                outputs=list(request.output_names) or None,
                parameters=parameters,
            )
            seen.outputs = result.outputs
        return rpc.InferResponse(
            model=ModelReference(model=model, version=call.version),
            id=request.id or call.call_id,
            usage=usage_pb2.Usage(input_items=call.input_items),
            outputs=await outputs_of(result.outputs, typed=sent_typed(list(request.inputs))),
        )

    async def Embed(self, request, context):  # type: ignore[no-untyped-def]
        embedded = await self.embed(
            current_principal().key, request.model, list(request.texts), _headers(context)
        )
        vectors = vectors_of(embedded.outputs, request.normalize)
        return rpc.EmbedResponse(
            model=ModelReference(model=request.model.model, version=embedded.version),
            embeddings=[pb.Embedding(values=row.tolist()) for row in vectors],
            dimension=int(vectors.shape[1]),
            usage=usage_pb2.Usage(prompt_tokens=embedded.prompt_tokens),
        )

    async def embed(
        self, key: pb.Key, reference: ModelReference, texts: list[str], headers: Mapping[str, str]
    ) -> Embedded:
        """Texts embedded by an embedding model on Triton (Embed and
        ``POST /v1/embeddings``)."""
        model = reference.model
        authorize(key, pb.PLATFORM_SERVICE_EMBED, model)
        self.triton.client()
        async with (
            self.admission(key, pb.PLATFORM_SERVICE_EMBED, model) as call,
            self.predictions.observe(EMBED, model, call, texts),
        ):
            call.input_items = len(texts)
            inputs = embedding_inputs(texts)
            result = await self.triton.infer(reference, key.id, headers, call, inputs)
            call.prompt_tokens = prompt_tokens_of(result.outputs, texts)
        return Embedded(result.outputs, call.version, call.prompt_tokens)

    async def ListModels(self, request, context):  # type: ignore[no-untyped-def]
        visible = self.catalog.visible(current_principal().key, request.kind)
        page, token = offset_page(visible, request.page_size, request.page_token)
        return rpc.ListModelsResponse(models=page, next_page_token=token)

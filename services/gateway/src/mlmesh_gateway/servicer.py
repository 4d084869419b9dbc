"""GatewayService: one API for every model.

Each handler turns the request into domain calls and the answer back:
the caller's key is checked (``authorize``) and its tensors (``tensors``; the
chassis has checked every field against the contract's rules), the call
admitted and metered (``admission``), the version chosen (``traffic_split``),
the backend called (``llm_router`` for the llm, ``triton_router`` for Infer
and Embed) and shadows mirrored (``shadows``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping

import grpc
from mlmesh.common.v1 import model_reference_pb2, usage_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_chassis.auth import authorize, current_principal
from mlmesh_chassis.errors import MlmeshError
from mlmesh_chassis.generation import check_prompt_size, max_tokens_of
from mlmesh_chassis.pagination import offset_page
from mlmesh_inference.triton import TritonClient
from mlmesh_metering import MeteredCall, Metering

from mlmesh_gateway.admission import Admission
from mlmesh_gateway.balancer import LatencyAwareBalancer
from mlmesh_gateway.directory import ModelDirectory
from mlmesh_gateway.embeddings import embedding_inputs, prompt_tokens_of, vectors_of
from mlmesh_gateway.generate_messages import to_gateway, to_llm, uses_deprecated_request
from mlmesh_gateway.llm_router import LlmRouter
from mlmesh_gateway.shadows import ShadowLog, ShadowRunner
from mlmesh_gateway.telemetry import TIME_TO_FIRST_TOKEN, annotate
from mlmesh_gateway.tensors import inputs_of, outputs_of, sent_typed, triton_parameters
from mlmesh_gateway.traffic_split import Split, TrafficSplit
from mlmesh_gateway.triton_router import TritonRouter

ModelReference = model_reference_pb2.ModelReference


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
    ) -> None:
        self.admission = Admission(meter)
        self.router = LlmRouter(llm)
        self.served = [(name, pb.MODEL_KIND_LLM) for name in llm_models]
        self.served += [(name, pb.MODEL_KIND_CLASSIC) for name in classic_models]
        self.served += [(name, pb.MODEL_KIND_EMBEDDING) for name in embedding_models]
        self.shadows = ShadowRunner(shadows)
        self.llm_split = TrafficSplit(directory, self.router.has_loaded, pin_served=False)
        self.triton = TritonRouter(triton, directory, self.shadows)

    async def Generate(self, request, context) -> AsyncIterator[rpc.GenerateResponse]:  # type: ignore[no-untyped-def,override]
        key = current_principal().key
        deprecated = uses_deprecated_request(request)
        inner = to_llm(request)  # the gateway's own message, or the deprecated llm one
        model = inner.model.model
        authorize(key, pb.PLATFORM_SERVICE_GENERATE, model)
        # The rest is the contract's rules (the chassis checks them first).
        check_prompt_size(inner, "request." if deprecated else "")
        asked = ModelReference()
        asked.CopyFrom(inner.model)
        split = await self.llm_split.route(asked, key.id, _headers(context))
        if split.version:
            inner.model.CopyFrom(ModelReference(model=model, version=split.version))
        # An arm's version an endpoint has not loaded: served as asked instead.
        fallback = asked if split.experiment is not None else None
        counted = await self.router.count_tokens(request.region, inner, fallback)
        max_tokens = max_tokens_of(inner.sampling)
        async with self.admission(
            key,
            pb.PLATFORM_SERVICE_GENERATE,
            model,
            reserve=counted + max(max_tokens, 0),
            request_id=inner.request_id,
        ) as call:
            annotate(
                **{
                    "gen_ai.system": "mlmesh",
                    "gen_ai.operation.name": "text_completion",
                    "gen_ai.request.model": model,
                    "gen_ai.request.max_tokens": max_tokens,
                }
            )
            # The engine's id: unique per call (the caller's stays beside it
            # in the usage event, for tracing only).
            inner.request_id = call.call_id
            call.prompt_tokens = counted
            started = time.monotonic()
            text: list[str] = []
            async for endpoint, chunk in self.router.stream(request.region, inner, fallback):
                if not text:  # the first chunk: say which backend serves the stream
                    call.region = endpoint.region
                    await context.send_initial_metadata(
                        (
                            ("x-mlmesh-backend", endpoint.address),
                            ("x-mlmesh-region", endpoint.region),
                        )
                    )
                if call.completion_tokens == 0 and chunk.token_count:
                    TIME_TO_FIRST_TOKEN.labels(model).observe(time.monotonic() - started)
                call.completion_tokens += chunk.token_count
                text.append(chunk.text)
                if chunk.HasField("model"):
                    call.version = chunk.model.version
                if chunk.HasField("usage"):
                    call.prompt_tokens = chunk.usage.prompt_tokens
                yield to_gateway(chunk, endpoint.region, deprecated=deprecated)
            still_pinned = inner.model.WhichOneof("selector") == "version"
            if split.shadow and still_pinned and split.shadow != call.version:
                self._shadow_generate(split, inner, call, "".join(text))

    def _shadow_generate(
        self, split: Split, inner: llm_rpc.GenerateRequest, call: MeteredCall, text: str
    ) -> None:
        """Mirrors a finished generation to the shadow version (same seed and
        settings): the texts agree or not."""
        assert split.experiment is not None
        mirrored = llm_rpc.GenerateRequest()
        mirrored.CopyFrom(inner)
        mirrored.model.CopyFrom(ModelReference(model=inner.model.model, version=split.shadow))
        mirrored.request_id = f"{call.call_id}-shadow"

        async def difference() -> float:
            return 0.0 if await self.router.complete(mirrored) == text else 1.0

        versions = (call.version, split.shadow)
        self.shadows.mirror(call.call_id, split.experiment, call.model, versions, difference)

    async def Infer(self, request, context):  # type: ignore[no-untyped-def]
        key = current_principal().key
        model = request.model.model
        authorize(key, pb.PLATFORM_SERVICE_INFER, model)
        self.triton.client()
        inputs = await inputs_of(request)
        parameters = triton_parameters(request.parameters)
        async with self.admission(
            key, pb.PLATFORM_SERVICE_INFER, model, request_id=request.id
        ) as call:
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
        return rpc.InferResponse(
            model=ModelReference(model=model, version=call.version),
            id=request.id or call.call_id,
            usage=usage_pb2.Usage(input_items=call.input_items),
            outputs=await outputs_of(result.outputs, typed=sent_typed(list(request.inputs))),
        )

    async def Embed(self, request, context):  # type: ignore[no-untyped-def]
        key = current_principal().key
        model = request.model.model
        authorize(key, pb.PLATFORM_SERVICE_EMBED, model)
        self.triton.client()
        texts = list(request.texts)
        async with self.admission(key, pb.PLATFORM_SERVICE_EMBED, model) as call:
            call.input_items = len(texts)
            result = await self.triton.infer(
                request.model, key.id, _headers(context), call, embedding_inputs(texts)
            )
            call.prompt_tokens = prompt_tokens_of(result.outputs, texts)
        vectors = vectors_of(result.outputs, request.normalize)
        return rpc.EmbedResponse(
            model=ModelReference(model=model, version=call.version),
            embeddings=[pb.Embedding(values=row.tolist()) for row in vectors],
            dimension=int(vectors.shape[1]),
            usage=usage_pb2.Usage(prompt_tokens=call.prompt_tokens),
        )

    async def ListModels(self, request, context):  # type: ignore[no-untyped-def]
        key = current_principal().key
        visible = []
        for name, kind in self.served:
            if request.kind and kind != request.kind:
                continue
            try:
                authorize(key, None, name)
            except MlmeshError:
                continue
            visible.append(pb.ServedModel(model=name, kind=kind))
        page, token = offset_page(visible, request.page_size, request.page_token)
        return rpc.ListModelsResponse(models=page, next_page_token=token)

"""LlmService: validate, tokenize, stream from the engine, report load."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from google.protobuf import duration_pb2
from mlmesh.common.v1 import model_reference_pb2, usage_pb2
from mlmesh.llm.v1 import llm_pb2, llm_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as rpc
from mlmesh_chassis.errors import (
    Aborted,
    FieldViolation,
    InvalidArgument,
    QuotaViolation,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from mlmesh_chassis.generation import check_prompt_size, max_tokens_of
from mlmesh_chassis.pagination import offset_page

from mlmesh_llm.config import LlmSettings
from mlmesh_llm.engines.base import (
    Engine,
    EngineDead,
    EngineRequest,
    FinishReason,
    ImageInput,
    QueueFull,
    RequestAborted,
    RequestFailed,
    RequestRejected,
    Sampling,
)
from mlmesh_llm.models import LoadedVersion, ModelManager

log = logging.getLogger("mlmesh.llm")
_FINISH = {
    FinishReason.STOP: llm_pb2.FINISH_REASON_STOP,
    FinishReason.STOP_SEQUENCE: llm_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.LENGTH: llm_pb2.FINISH_REASON_LENGTH,
}
_ROLES = {
    llm_pb2.CHAT_ROLE_SYSTEM: "system",
    llm_pb2.CHAT_ROLE_USER: "user",
    llm_pb2.CHAT_ROLE_ASSISTANT: "assistant",
}


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def _load_metadata(engine: Engine) -> tuple[tuple[str, str], ...]:
    load = engine.load()
    return (
        ("mlmesh-load-waiting", str(load.waiting)),
        ("mlmesh-load-running", str(load.running)),
        ("mlmesh-load-kv-cache", f"{load.kv_cache_usage:.4f}"),
    )


def _load_message(engine: Engine) -> llm_pb2.Load:
    load = engine.load()
    return llm_pb2.Load(
        waiting_requests=load.waiting,
        running_requests=load.running,
        kv_cache_usage=load.kv_cache_usage,
    )


class LlmServicer(llm_service_pb2_grpc.LlmServiceServicer):
    def __init__(
        self,
        models: ModelManager,
        settings: LlmSettings,
        on_engine_dead: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.models = models
        self.settings = settings
        # Called when an engine dies for good (the server stops reporting
        # SERVING, so the balancer and Envoy's health checks go elsewhere).
        self.on_engine_dead = on_engine_dead

    async def Generate(self, request, context) -> AsyncIterator[rpc.GenerateResponse]:  # type: ignore[no-untyped-def,override]
        loaded = self.models.lookup(request.model)
        engine = loaded.engine
        sampling = self._sampling(request.sampling)
        images = self._images(engine, loaded, request)
        prompt_ids = await self._prompt_ids(engine, request, len(images))
        context_length = engine.info.context_length
        if len(prompt_ids) + sampling.max_tokens > context_length:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                f"exceeds the context length {context_length}",
                [
                    FieldViolation(
                        "sampling.max_tokens",
                        f"at most {max(context_length - len(prompt_ids), 0)} for this prompt",
                    )
                ],
                prompt_tokens=len(prompt_ids),
                max_tokens=sampling.max_tokens,
                context_length=context_length,
            )
        # The engine's id is the server's own: the caller's id (the gateway
        # sends its call id) only prefixes it, so two calls never share one.
        request_id = f"{request.request_id}:{uuid.uuid4().hex}".removeprefix(":")
        remaining = context.time_remaining()
        engine_request = EngineRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling,
            images=images,
            deadline=time.monotonic() + remaining if remaining is not None else None,
        )
        with self.models.lease(loaded):
            stream = engine.generate(engine_request)
            try:
                first = True
                async for delta in stream:
                    response = rpc.GenerateResponse(text=delta.text, token_count=delta.token_count)
                    if first:
                        response.model.CopyFrom(
                            model_reference_pb2.ModelReference(
                                model=loaded.model, version=loaded.version
                            )
                        )
                        first = False
                    if delta.finish_reason is not None:
                        response.finish_reason = _FINISH[delta.finish_reason]
                        response.usage.CopyFrom(
                            usage_pb2.Usage(
                                prompt_tokens=delta.prompt_tokens,
                                completion_tokens=delta.completion_tokens,
                                cached_tokens=delta.cached_tokens,
                            )
                        )
                        response.timings.CopyFrom(
                            llm_pb2.Timings(
                                queue_duration=_duration(delta.queue_seconds),
                                time_to_first_token=_duration(delta.first_token_seconds),
                                time_per_output_token=_duration(delta.per_token_seconds),
                            )
                        )
                        response.load.CopyFrom(_load_message(engine))
                        context.set_trailing_metadata(_load_metadata(engine))
                    yield response
            except QueueFull as full:
                context.set_trailing_metadata(_load_metadata(engine))
                raise ResourceExhausted(
                    f"the engine's queue is full ({full.waiting} waiting); retry later",
                    [
                        QuotaViolation(
                            f"model:{loaded.model}/{loaded.version}", "engine waiting queue"
                        )
                    ],
                    retry_after_s=full.retry_after_s,
                    waiting=full.waiting,
                ) from full
            except RequestRejected as rejected:
                field = rejected.field or "request"
                raise InvalidArgument(
                    f"the engine refused the request: {rejected}",
                    [FieldViolation(field, str(rejected))],
                    field=field,
                    cause=rejected,
                ) from rejected
            except RequestFailed as failed:
                raise Unavailable(
                    f"the engine failed the request: {failed}; retry",
                    retry_after_s=failed.retry_after_s,
                    failed=failed,
                ) from failed
            except RequestAborted as aborted:
                raise Aborted(
                    f"the engine ended the stream: {aborted}",
                    Reason.ERROR_REASON_BACKEND_UNAVAILABLE,
                    aborted=aborted,
                ) from aborted
            except EngineDead as dead:
                log.error("engine for %s/%d died: %s", loaded.model, loaded.version, dead)
                if self.on_engine_dead is not None:
                    await self.on_engine_dead()
                raise Unavailable(
                    f"{dead}; this server no longer serves", retry_after_s=5.0, dead=dead
                ) from dead
            finally:
                await stream.aclose()  # on cancel or error: abort in the engine now

    async def CountTokens(self, request, context):  # type: ignore[no-untyped-def]
        loaded = self.models.lookup(request.model)
        ids = await self._prompt_ids(loaded.engine, request)
        context.set_trailing_metadata(_load_metadata(loaded.engine))
        return rpc.CountTokensResponse(
            token_count=len(ids), context_length=loaded.engine.info.context_length
        )

    async def ListModels(self, request, context):  # type: ignore[no-untyped-def]
        items = sorted(self._describe_all(), key=lambda m: (m.reference.model, m.reference.alias))
        page, token = offset_page(items, request.page_size, request.page_token)
        return rpc.ListModelsResponse(models=page, next_page_token=token)

    async def GetModel(self, request, context):  # type: ignore[no-untyped-def]
        loaded = self.models.lookup(request.model)
        context.set_trailing_metadata(_load_metadata(loaded.engine))
        return rpc.GetModelResponse(model=self._describe(request.model, loaded))

    # ---- helpers ------------------------------------------------------------

    def _describe_all(self) -> list[llm_pb2.LoadedModel]:
        return [
            self._describe(served.reference, loaded)
            for served, loaded in self.models.current_versions()
        ]

    def _describe(self, reference, loaded: LoadedVersion) -> llm_pb2.LoadedModel:  # type: ignore[no-untyped-def]
        info = loaded.engine.info
        capabilities = [llm_pb2.CAPABILITY_STREAMING]
        if info.chat:
            capabilities.append(llm_pb2.CAPABILITY_CHAT)
        if info.image_input:
            capabilities.append(llm_pb2.CAPABILITY_IMAGE_INPUT)
        if info.speculative:
            capabilities.append(llm_pb2.CAPABILITY_SPECULATIVE_DECODING)
        model = llm_pb2.LoadedModel(
            reference=reference,
            resolved_version=loaded.version,
            context_length=info.context_length,
            capabilities=capabilities,
            engine=loaded.engine.name,
            load=_load_message(loaded.engine),
        )
        model.load_time.FromDatetime(loaded.load_time)
        return model

    def _sampling(self, params: llm_pb2.SamplingParams) -> Sampling:
        """The engine's sampling settings: unset fields take the defaults (the
        contract's rules, checked by the chassis, bound the set ones)."""
        return Sampling(
            max_tokens=max_tokens_of(params),
            temperature=params.temperature if params.HasField("temperature") else 1.0,
            top_p=params.top_p if params.HasField("top_p") else 1.0,
            top_k=params.top_k if params.HasField("top_k") else 0,
            stop=tuple(params.stop),
            seed=params.seed if params.HasField("seed") else None,
        )

    async def _prompt_ids(self, engine: Engine, request, images: int = 0) -> list[int]:  # type: ignore[no-untyped-def]
        """The prompt's token ids. The size is capped before tokenizing, and
        tokenizing runs in a worker thread: a long prompt never stalls the
        other streams on this event loop.

        With ``images``, the model's image placeholder goes in once per image,
        before the text (of the last user turn, in a chat), as vLLM's own
        chat rendering places missing placeholders; the engine expands each
        into the image's tokens."""
        check_prompt_size(request)
        # The contract's rules (checked by the chassis) make the prompt set,
        # its text non-empty and its chat's roles known.
        kind = request.WhichOneof("prompt")
        placeholders = [engine.info.image_placeholder] * images if images else []
        if kind == "text":
            text = "\n".join([*placeholders, request.text])
            ids = await asyncio.to_thread(engine.tokenizer.encode, text)
        else:
            if not engine.info.chat:
                raise InvalidArgument.field("chat", "this model has no chat template")
            turns = [(_ROLES[m.role], m.content) for m in request.chat.messages]
            if placeholders:
                users = [i for i, (role, _) in enumerate(turns) if role == "user"]
                at = users[-1] if users else len(turns) - 1
                turns[at] = (turns[at][0], "\n".join([*placeholders, turns[at][1]]))
            ids = await asyncio.to_thread(
                lambda: engine.tokenizer.encode(engine.tokenizer.render_chat(turns))
            )
        context_length = engine.info.context_length
        if len(ids) >= context_length:
            raise InvalidArgument(
                f"the prompt has {len(ids)} tokens; the context length is {context_length}",
                [FieldViolation(kind, f"at most {context_length - 1} tokens")],
                prompt_tokens=len(ids),
                context_length=context_length,
            )
        return ids

    def _images(self, engine: Engine, loaded: LoadedVersion, request) -> list[ImageInput]:  # type: ignore[no-untyped-def]
        if not request.images:
            return []
        if not engine.info.image_input:
            raise InvalidArgument(
                f"model {loaded.model}/{loaded.version} does not accept images",
                [FieldViolation("images", "this model is text-only")],
                model=f"{loaded.model}/{loaded.version}",
            )
        # Their number, types and sizes: the contract's rules.
        return [ImageInput(image.data, image.media_type) for image in request.images]

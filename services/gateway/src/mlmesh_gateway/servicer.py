"""GatewayService: one API for every model."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
from mlmesh.common.v1 import model_reference_pb2, usage_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_chassis.auth import authorize, current_principal
from mlmesh_chassis.errors import (
    MlmeshError,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
)
from mlmesh_chassis.generation import max_tokens_of
from mlmesh_chassis.interceptors import propagation
from mlmesh_chassis.pagination import offset_page
from mlmesh_inference.triton import TritonClient
from mlmesh_metering import Limits, MeteredCall, Metering
from mlmesh_metering.ledger import UsageLedger

from mlmesh_gateway.balancer import Endpoint, LatencyAwareBalancer
from mlmesh_gateway.directory import ModelDirectory
from mlmesh_gateway.experiments import choose_arm, mirror
from mlmesh_gateway.request_checks import check_embed, check_generate, check_model
from mlmesh_gateway.shadows import ShadowLog
from mlmesh_gateway.telemetry import (
    BACKEND_PICKS,
    REJECTIONS,
    REQUESTS,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    annotate,
)
from mlmesh_gateway.tensors import from_numpy, to_numpy

log = logging.getLogger("mlmesh.gateway")
# Shadow answers farther than this (max absolute difference) from the primary's
# are recorded as disagreeing.
SHADOW_TOLERANCE = 1e-3
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
# How long the gateway trusts what Triton said about an arm's version.
ARM_READY_TTL_S = 1.0


def limits_of(key: pb.Key) -> Limits:
    return Limits(
        key.limits.tokens_per_minute,
        key.limits.requests_per_minute,
        key.limits.max_concurrent_streams,
    )


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
        self.meter = meter
        self.throttle = meter.throttle
        # (model, version) -> (when asked, live on Triton): experiment arms.
        self._arm_ready: dict[tuple[str, int], tuple[float, bool]] = {}
        # The gateway is the ledger's writer: quotas read it.
        assert isinstance(meter.sink, UsageLedger), "the gateway meters into the ledger"
        self.ledger: UsageLedger = meter.sink
        self.shadows = shadows
        self.llm = llm
        self.triton = triton
        self.llm_models = llm_models
        self.classic_models = classic_models
        self.embedding_models = embedding_models
        self.directory = directory
        self._shadows = asyncio.Semaphore(16)
        self._background: set[asyncio.Task[None]] = set()

    async def _caller(self, context) -> pb.Key:  # type: ignore[no-untyped-def]
        """The caller's key, verified by the chassis."""
        return current_principal().key

    # ---- Generate ---------------------------------------------------------------

    async def Generate(self, request, context) -> AsyncIterator[rpc.GenerateResponse]:  # type: ignore[no-untyped-def,override]
        key = await self._caller(context)
        inner = llm_rpc.GenerateRequest()
        inner.CopyFrom(request.request)
        model = inner.model.model
        authorize(key, pb.PLATFORM_SERVICE_GENERATE, model)
        check_generate(request)  # every caller-supplied value, before anything is reserved
        experiment = None
        # The reference as asked: served instead of an experiment arm whose
        # version the llm has not loaded yet (it loads after the experiment
        # starts), so a new experiment never turns requests into NOT_FOUND.
        asked: model_reference_pb2.ModelReference | None = None
        if inner.model.WhichOneof("selector") != "version" and self.directory is not None:
            experiment = await self.directory.experiment(model)
            if experiment is not None and experiment.arms:
                arm = choose_arm(experiment, self._sticky_value(experiment, key, context))
                asked = model_reference_pb2.ModelReference()
                asked.CopyFrom(inner.model)
                inner.model.CopyFrom(
                    model_reference_pb2.ModelReference(model=model, version=arm.version)
                )
                annotate(
                    **{"mlmesh.experiment": experiment.name, "mlmesh.experiment.arm": arm.name}
                )
            else:
                experiment = None
        candidates = self.llm.candidates(request.region)
        if not candidates:
            raise Unavailable("no LLM endpoint is configured", retry_after_s=5.0)
        counted = await self._count_tokens(candidates, inner, asked)
        if asked is not None and inner.model == asked:
            asked = None  # unpinned while counting: nothing left to fall back to
        max_tokens = max_tokens_of(inner.sampling)
        reserve = counted + max(max_tokens, 0)
        await self._check_quota(key, reserve)
        # Reservation and usage event are keyed by a call id made here; the
        # caller's request id is kept beside it for tracing only.
        async with self.meter.admit(
            key.id,
            limits_of(key),
            reserve=reserve,
            request_id=inner.request_id,
            model=model,
            service=pb.PLATFORM_SERVICE_GENERATE,
        ) as call:
            annotate(
                **{
                    "gen_ai.system": "mlmesh",
                    "gen_ai.operation.name": "text_completion",
                    "gen_ai.request.model": model,
                    "gen_ai.request.max_tokens": max_tokens,
                    "mlmesh.key_id": key.id,
                    "mlmesh.request_id": inner.request_id,
                    "mlmesh.call_id": call.call_id,
                }
            )
            inner.request_id = call.call_id  # the engine's id: unique per call
            call.prompt_tokens = counted
            started = time.monotonic()
            status = "OK"
            text: list[str] = []
            try:
                async for endpoint, chunk in self._stream(request.region, inner, started, asked):
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
                    chunk.ClearField("load")  # internal to the balancer
                    yield rpc.GenerateResponse(response=chunk, region=endpoint.region)
                shadow = mirror(experiment)
                if shadow and shadow != call.version:
                    self._shadow_generate(experiment, inner, call, "".join(text), shadow)
            except grpc.RpcError as error:  # the backend's status goes back as it is
                status = error.code().name  # type: ignore[attr-defined]
                raise
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            except MlmeshError as error:
                status = error.code.name
                raise
            finally:
                # What was used; the meter settles it and records it once, even
                # on cancel.
                call.status = status
                call.settle(call.prompt_tokens + call.completion_tokens)
                self._observe(call)

    async def _check_quota(self, key: pb.Key, reserve: int) -> None:
        """The key's token quota per period, read from the usage ledger. Soft by
        at most what is in flight: streams still running are not in the ledger
        yet (the per-minute limits bound that)."""
        quota = key.limits.token_quota
        if quota <= 0:
            return
        start, end = period(key.limits.token_quota_period, dt.datetime.now(dt.UTC))
        used = await self.ledger.tokens_since(key.id, start)
        if used + reserve > quota:
            REJECTIONS.labels("token_quota").inc()
            raise ResourceExhausted(
                f"key {key.id} used {used} of its {quota} tokens this period",
                [QuotaViolation(f"key:{key.id}", "token_quota")],
                (end - dt.datetime.now(dt.UTC)).total_seconds(),
                key_id=key.id,
                used=used,
                quota=quota,
            )

    @staticmethod
    def _observe(call: MeteredCall) -> None:
        REQUESTS.labels("generate", call.model, call.status).inc()
        TOKENS.labels(call.model, "input").inc(call.prompt_tokens)
        TOKENS.labels(call.model, "output").inc(call.completion_tokens)
        annotate(
            **{
                "gen_ai.usage.input_tokens": call.prompt_tokens,
                "gen_ai.usage.output_tokens": call.completion_tokens,
                "gen_ai.response.model": f"{call.model}/{call.version}",
                "server.address": call.region,
            }
        )

    async def _count_tokens(self, candidates: list[Endpoint], inner, asked=None) -> int:  # type: ignore[no-untyped-def]
        request = llm_rpc.CountTokensRequest(model=inner.model)
        if inner.WhichOneof("prompt") == "chat":
            request.chat.CopyFrom(inner.chat)
        else:
            request.text = inner.text
        last: grpc.RpcError | None = None
        for endpoint in candidates[:3]:
            try:
                metadata, timeout = propagation(10.0)
                try:
                    reply = await endpoint.stub.CountTokens(
                        request, metadata=metadata, timeout=timeout
                    )
                except grpc.RpcError as error:
                    if asked is None or error.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                        raise
                    _unpin(inner, asked)  # the arm's version is not loaded: as asked
                    request.model.CopyFrom(asked)
                    reply = await endpoint.stub.CountTokens(
                        request, metadata=metadata, timeout=timeout
                    )
                return int(reply.token_count)
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE:  # type: ignore[attr-defined]
                    raise
                self.llm.failed(endpoint)
                last = error
        assert last is not None
        raise last

    async def _stream(
        self, region: str, inner, started: float, asked=None
    ) -> AsyncIterator[tuple[Endpoint, llm_rpc.GenerateResponse]]:  # type: ignore[no-untyped-def]
        """Streams from the best endpoint; before the first token, a failed
        endpoint is ejected and the next one tried, and an endpoint that has
        not loaded the pinned arm's version serves the reference as
        ``asked``. Endpoints are ranked here, with no await between ranking
        and counting the request in flight, so concurrent requests see each
        other."""
        tried: set[int] = set()
        for attempt in range(3):
            remaining = [e for e in self.llm.candidates(region) if id(e) not in tried]
            if not remaining:
                break
            endpoint = remaining[0]
            tried.add(id(endpoint))
            endpoint.in_flight += 1
            endpoint.picks += 1
            BACKEND_PICKS.labels(endpoint.address, endpoint.region).inc()
            metadata, timeout = propagation()
            call = endpoint.stub.Generate(inner, metadata=metadata, timeout=timeout)
            first = True
            try:
                async for chunk in call:
                    if first:
                        self.llm.observe_first_token(endpoint, time.monotonic() - started)
                        first = False
                    yield endpoint, chunk
                self.llm.observe_load(endpoint, await call.trailing_metadata())
                return
            except grpc.RpcError as error:
                if first and asked is not None and error.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                    _unpin(inner, asked)  # this endpoint lacks the arm's version
                    asked = None
                    tried.discard(id(endpoint))
                    continue
                if first and error.code() in RETRYABLE and attempt < 2:  # type: ignore[attr-defined]
                    self.llm.failed(endpoint)
                    continue  # nothing was sent yet: try elsewhere
                if error.code() in RETRYABLE:  # type: ignore[attr-defined]
                    self.llm.failed(endpoint)
                raise
            finally:
                endpoint.in_flight -= 1
                call.cancel()
        raise Unavailable("no LLM endpoint could take the request", retry_after_s=1.0)

    # ---- Infer and Embed ---------------------------------------------------------

    async def Infer(self, request, context):  # type: ignore[no-untyped-def]
        key = await self._caller(context)
        model = request.model.model
        authorize(key, pb.PLATFORM_SERVICE_INFER, model)
        triton = self._triton()
        inputs = {
            tensor.name: to_numpy(tensor, f"inputs[{i}]") for i, tensor in enumerate(request.inputs)
        }
        items = int(sum(array.size for array in inputs.values()))
        check_model(model, "model.model")
        async with self.meter.admit(
            key.id,
            limits_of(key),
            unit="items",
            request_id=request.id,
            model=model,
            service=pb.PLATFORM_SERVICE_INFER,
            stream=False,
        ) as call:
            call.input_items = items
            call.settle(items)
            annotate(**{"mlmesh.request_id": request.id, "mlmesh.call_id": call.call_id})
            try:
                version, experiment, arm = await self._pick_version(request.model, key, context)
                annotate(
                    **{
                        "mlmesh.experiment": experiment.name if experiment else None,
                        "mlmesh.experiment.arm": arm,
                    }
                )
                call.version = int(version or 0)
                result = await triton.infer(
                    model,
                    inputs,
                    version=version,
                    outputs=list(request.output_names) or None,
                    request_id=call.call_id,
                )
                call.version = int(result.model_version or call.version)
                shadow = mirror(experiment)
                if shadow and shadow != int(result.model_version or 0):
                    self._shadow(experiment, model, inputs, result, shadow, call.call_id)
            except MlmeshError as error:
                call.status = error.code.name
                raise
            finally:
                REQUESTS.labels("infer", model, call.status).inc()
                annotate(**{"mlmesh.model": model, "mlmesh.input_items": items})
        return rpc.InferResponse(
            model=model_reference_pb2.ModelReference(
                model=model, version=int(result.model_version or 0)
            ),
            id=request.id or call.call_id,
            usage=usage_pb2.Usage(input_items=items),
            outputs=[from_numpy(name, array) for name, array in result.outputs.items()],
        )

    async def _ready_on_triton(self, model: str, version: int) -> bool:
        """Whether Triton has ``model``/``version`` live (asked at most once
        per ARM_READY_TTL_S per version)."""
        now = time.monotonic()
        cached = self._arm_ready.get((model, version))
        if cached is not None and now - cached[0] < ARM_READY_TTL_S:
            return cached[1]
        ready = self.triton is not None and await self.triton.model_ready(model, str(version))
        if len(self._arm_ready) >= 1024:  # experiments' versions: few; never unbounded
            self._arm_ready.clear()
        self._arm_ready[(model, version)] = (now, ready)
        return ready

    async def _pick_version(self, reference, key: pb.Key, context):  # type: ignore[no-untyped-def]
        """The version to serve: a pinned one as asked; else the arm of the
        model's running experiment (sticky by the experiment's key); else the
        alias's version. Versions are always pinned, so Triton serving several
        (for experiments) never picks one by itself."""
        if reference.WhichOneof("selector") == "version":
            return str(reference.version), None, ""
        if self.directory is None:
            return "", None, ""
        experiment = await self.directory.experiment(reference.model)
        if experiment is not None and experiment.arms:
            arm = choose_arm(experiment, self._sticky_value(experiment, key, context))
            if await self._ready_on_triton(reference.model, arm.version):
                return str(arm.version), experiment, arm.name
            # Not live on Triton yet (the deployer loads it after the
            # experiment starts): the reference as asked serves meanwhile.
            annotate(**{"mlmesh.experiment.arm_loaded": False})
            experiment = None
        alias = reference.alias if reference.WhichOneof("selector") == "alias" else ""
        return str(await self.directory.version(reference.model, alias)), None, ""

    @staticmethod
    def _sticky_value(experiment, key: pb.Key, context) -> str:  # type: ignore[no-untyped-def]
        """What keeps a caller on one arm: its key, or a header it sends
        (`user_id` is read from `x-mlmesh-user-id`: the front door rejects
        headers with underscores)."""
        if experiment.stickiness_key == "api_key":
            return key.id
        metadata = dict(context.invocation_metadata() or ())
        header = f"x-mlmesh-{experiment.stickiness_key.replace('_', '-')}"
        return str(metadata.get(header, key.id))

    def _shadow_generate(
        self,
        experiment,  # type: ignore[no-untyped-def]
        inner,
        call: MeteredCall,
        primary_text: str,
        version: int,
    ) -> None:
        """Mirrors a finished generation to the shadow version off the caller's
        path; records whether the texts agree (same seed and settings)."""
        if self._shadows.locked() or self.shadows is None:
            return
        shadows = self.shadows
        mirrored = llm_rpc.GenerateRequest()
        mirrored.CopyFrom(inner)
        mirrored.model.CopyFrom(
            model_reference_pb2.ModelReference(model=inner.model.model, version=version)
        )
        mirrored.request_id = f"{call.call_id}-shadow"

        async def run() -> None:
            async with self._shadows:
                try:
                    endpoint = self.llm.candidates()[0]
                    metadata, _ = propagation()
                    chunks = [
                        c
                        async for c in endpoint.stub.Generate(
                            mirrored, metadata=metadata, timeout=60
                        )
                    ]
                    shadow_text = "".join(c.text for c in chunks)
                    agreed = shadow_text == primary_text
                    await shadows.record(
                        call.call_id,
                        experiment.name,
                        inner.model.model,
                        call.version,
                        version,
                        0.0 if agreed else 1.0,
                        agreed,
                    )
                except Exception as error:  # a shadow never affects the caller
                    log.warning("shadow of %s failed: %s", call.call_id, error)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _shadow(
        self,
        experiment,
        model: str,
        inputs,
        primary,
        version: int,  # type: ignore[no-untyped-def]
        request_id: str,
    ) -> None:
        """Mirrors the request to the shadow version off the caller's path and
        records whether the answers agree (within SHADOW_TOLERANCE)."""
        if self._shadows.locked() or self.shadows is None:
            return  # shadow traffic is best effort: never queue behind it
        shadows = self.shadows

        async def run() -> None:
            async with self._shadows:
                try:
                    shadow = await self._triton().infer(
                        model, inputs, version=str(version), request_id=f"{request_id}-shadow"
                    )
                    diff = max(
                        float(
                            np.max(
                                np.abs(
                                    primary.outputs[name].astype(np.float64)
                                    - shadow.outputs[name].astype(np.float64)
                                )
                            )
                        )
                        for name in primary.outputs
                    )
                    await shadows.record(
                        request_id,
                        experiment.name,
                        model,
                        int(primary.model_version or 0),
                        version,
                        diff,
                        diff <= SHADOW_TOLERANCE,
                    )
                except Exception as error:  # a shadow never affects the caller
                    log.warning("shadow of %s failed: %s", request_id, error)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def Embed(self, request, context):  # type: ignore[no-untyped-def]
        key = await self._caller(context)
        model = request.model.model
        authorize(key, pb.PLATFORM_SERVICE_EMBED, model)
        check_embed(request)
        async with self.meter.admit(
            key.id,
            limits_of(key),
            unit="items",
            model=model,
            service=pb.PLATFORM_SERVICE_EMBED,
            stream=False,
        ) as call:
            call.input_items = len(request.texts)
            call.settle(len(request.texts))
            texts = np.array([[text] for text in request.texts], dtype=object)
            result = await self._triton().infer(model, {"text": texts}, request_id=call.call_id)
            call.version = int(result.model_version or 0)
        vectors = next(iter(result.outputs.values()))
        if request.normalize:
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
        return rpc.EmbedResponse(
            model=model_reference_pb2.ModelReference(
                model=model, version=int(result.model_version or 0)
            ),
            embeddings=[pb.Embedding(values=row.tolist()) for row in vectors],
            dimension=int(vectors.shape[1]),
            usage=usage_pb2.Usage(input_items=len(texts)),
        )

    def _triton(self) -> TritonClient:
        if self.triton is None:
            raise Unavailable("no Triton server is configured", retry_after_s=5.0)
        return self.triton

    async def ListModels(self, request, context):  # type: ignore[no-untyped-def]
        key = await self._caller(context)
        served = [(name, pb.MODEL_KIND_LLM) for name in self.llm_models]
        served += [(name, pb.MODEL_KIND_CLASSIC) for name in self.classic_models]
        served += [(name, pb.MODEL_KIND_EMBEDDING) for name in self.embedding_models]
        visible = []
        for name, kind in served:
            if request.kind and kind != request.kind:
                continue
            try:
                authorize(key, None, name)
            except MlmeshError:
                continue
            visible.append(pb.ServedModel(model=name, kind=kind))
        page, token = offset_page(visible, request.page_size, request.page_token)
        return rpc.ListModelsResponse(models=page, next_page_token=token)


def _unpin(inner, asked: model_reference_pb2.ModelReference) -> None:  # type: ignore[no-untyped-def]
    """Serves the reference as the caller asked instead of an experiment
    arm's version that is not loaded yet (said on the span)."""
    inner.model.CopyFrom(asked)
    annotate(**{"mlmesh.experiment.arm_loaded": False})


def period(kind: int, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The current quota period (UTC): day (default), week (from Monday), month."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == pb.QUOTA_PERIOD_WEEK:
        start = day - dt.timedelta(days=day.weekday())
        return start, start + dt.timedelta(days=7)
    if kind == pb.QUOTA_PERIOD_MONTH:
        start = day.replace(day=1)
        return start, (start + dt.timedelta(days=32)).replace(day=1)
    return day, day + dt.timedelta(days=1)

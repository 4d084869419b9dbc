"""GatewayService: one API for every model. UsageService: the ledger's totals."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import numpy as np
from mlmesh.common.v1 import model_reference_pb2, usage_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, usage_service_pb2, usage_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_chassis.auth import authorize, current_principal
from mlmesh_chassis.errors import (
    InvalidArgument,
    MlmeshError,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
)
from mlmesh_chassis.interceptors import propagation
from mlmesh_chassis.pagination import offset_page
from mlmesh_inference.triton import TritonClient
from tritonclient.utils import triton_to_np_dtype

from mlmesh_gateway.balancer import Endpoint, LatencyAwareBalancer
from mlmesh_gateway.directory import ModelDirectory
from mlmesh_gateway.experiments import choose_arm, mirror
from mlmesh_gateway.ledger import UsageEvent, UsageLedger
from mlmesh_gateway.telemetry import (
    BACKEND_PICKS,
    REJECTIONS,
    REQUESTS,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    annotate,
)
from mlmesh_gateway.throttle import Decision, Limits, Throttle

log = logging.getLogger("mlmesh.gateway")
DEFAULT_MAX_TOKENS = 256
# Shadow answers farther than this (max absolute difference) from the primary's
# are recorded as disagreeing.
SHADOW_TOLERANCE = 1e-3
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def limits_of(key: pb.Key) -> Limits:
    return Limits(
        key.limits.tokens_per_minute,
        key.limits.requests_per_minute,
        key.limits.max_concurrent_streams,
    )


class GatewayServicer(gateway_service_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        throttle: Throttle,
        ledger: UsageLedger,
        llm: LatencyAwareBalancer,
        triton: TritonClient | None,
        llm_models: list[str],
        classic_models: list[str],
        embedding_models: list[str],
        directory: ModelDirectory | None = None,
    ) -> None:
        self.throttle = throttle
        self.ledger = ledger
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
        inner.request_id = inner.request_id or uuid.uuid4().hex
        experiment = None
        if inner.model.WhichOneof("selector") != "version" and self.directory is not None:
            experiment = await self.directory.experiment(model)
            if experiment is not None and experiment.arms:
                arm = choose_arm(experiment, self._sticky_value(experiment, key, context))
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
        counted = await self._count_tokens(candidates, inner)
        max_tokens = (
            inner.sampling.max_tokens
            if inner.sampling.HasField("max_tokens")
            else DEFAULT_MAX_TOKENS
        )
        subject = f"key:{key.id}"
        annotate(
            **{
                "gen_ai.system": "mlmesh",
                "gen_ai.operation.name": "text_completion",
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": max_tokens,
                "mlmesh.key_id": key.id,
                "mlmesh.request_id": inner.request_id,
            }
        )
        await self._check_quota(key, counted + max(max_tokens, 0))
        decision = await self.throttle.admit(
            subject, inner.request_id, counted + max(max_tokens, 0), limits_of(key)
        )
        if not decision.admitted:
            REJECTIONS.labels(decision.violated).inc()
            raise over_limit(key, decision)
        started = time.monotonic()
        streamed, prompt_tokens, version, status = 0, counted, 0, "OK"
        text: list[str] = []
        endpoint: Endpoint | None = None
        try:
            async for endpoint, chunk in self._stream(request.region, inner, started):
                if not text:  # the first chunk: say which backend serves the stream
                    await context.send_initial_metadata(
                        (
                            ("x-mlmesh-backend", endpoint.address),
                            ("x-mlmesh-region", endpoint.region),
                        )
                    )
                if streamed == 0 and chunk.token_count:
                    TIME_TO_FIRST_TOKEN.labels(model).observe(time.monotonic() - started)
                streamed += chunk.token_count
                text.append(chunk.text)
                if chunk.HasField("model"):
                    version = chunk.model.version
                if chunk.HasField("usage"):
                    prompt_tokens = chunk.usage.prompt_tokens
                chunk.ClearField("load")  # internal to the balancer
                yield rpc.GenerateResponse(response=chunk, region=endpoint.region)
            shadow = mirror(experiment)
            if shadow and shadow != version:
                self._shadow_generate(experiment, inner, "".join(text), version, shadow)
        except grpc.RpcError as error:  # the backend's status goes back as it is
            status = error.code().name  # type: ignore[attr-defined]
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        finally:
            # Settle to what was used and record it once, even on cancel.
            await asyncio.shield(
                self._settle(
                    subject,
                    inner.request_id,
                    prompt_tokens,
                    streamed,
                    UsageEvent(
                        request_id=inner.request_id,
                        key_id=key.id,
                        service=pb.PLATFORM_SERVICE_GENERATE,
                        model=model,
                        version=version,
                        region=endpoint.region if endpoint else "",
                        prompt_tokens=prompt_tokens,
                        completion_tokens=streamed,
                        latency_ms=(time.monotonic() - started) * 1000,
                        status=status,
                    ),
                )
            )

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

    async def _settle(
        self, subject: str, request_id: str, prompt: int, streamed: int, event: UsageEvent
    ) -> None:
        await self.throttle.settle(subject, request_id, prompt + streamed)
        REQUESTS.labels("generate", event.model, event.status).inc()
        TOKENS.labels(event.model, "input").inc(prompt)
        TOKENS.labels(event.model, "output").inc(streamed)
        annotate(
            **{
                "gen_ai.usage.input_tokens": prompt,
                "gen_ai.usage.output_tokens": streamed,
                "gen_ai.response.model": f"{event.model}/{event.version}",
                "server.address": event.region,
            }
        )
        try:
            await self.ledger.record(event)
        except MlmeshError as error:
            log.error("usage event for %s not recorded: %s", request_id, error.message)

    async def _count_tokens(self, candidates: list[Endpoint], inner) -> int:  # type: ignore[no-untyped-def]
        request = llm_rpc.CountTokensRequest(model=inner.model)
        if inner.WhichOneof("prompt") == "chat":
            request.chat.CopyFrom(inner.chat)
        else:
            request.text = inner.text
        last: grpc.RpcError | None = None
        for endpoint in candidates[:3]:
            try:
                metadata, timeout = propagation(10.0)
                reply = await endpoint.stub.CountTokens(request, metadata=metadata, timeout=timeout)
                return int(reply.token_count)
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE:  # type: ignore[attr-defined]
                    raise
                self.llm.failed(endpoint)
                last = error
        assert last is not None
        raise last

    async def _stream(
        self, region: str, inner, started: float
    ) -> AsyncIterator[tuple[Endpoint, llm_rpc.GenerateResponse]]:  # type: ignore[no-untyped-def]
        """Streams from the best endpoint; before the first token, a failed
        endpoint is ejected and the next one tried. Endpoints are ranked here,
        with no await between ranking and counting the request in flight, so
        concurrent requests see each other."""
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
            tensor.name: _to_numpy(tensor, f"inputs[{i}]")
            for i, tensor in enumerate(request.inputs)
        }
        items = int(sum(array.size for array in inputs.values()))
        request_id = request.id or uuid.uuid4().hex
        await self._admit_unary(key, request_id)
        started = time.monotonic()
        status = "OK"
        experiment = None
        try:
            version, experiment, arm = await self._pick_version(request.model, key, context)
            annotate(
                **{
                    "mlmesh.experiment": experiment.name if experiment else None,
                    "mlmesh.experiment.arm": arm,
                }
            )
            result = await triton.infer(
                model,
                inputs,
                version=version,
                outputs=list(request.output_names) or None,
                request_id=request_id,
            )
            shadow = mirror(experiment)
            if shadow and shadow != int(result.model_version or 0):
                self._shadow(experiment, model, inputs, result, shadow, request_id)
        except MlmeshError as error:
            status = error.code.name
            raise
        finally:
            REQUESTS.labels("infer", model, status).inc()
            annotate(**{"mlmesh.model": model, "mlmesh.input_items": items})
            await asyncio.shield(
                self.ledger.record(
                    UsageEvent(
                        request_id=request_id,
                        key_id=key.id,
                        service=pb.PLATFORM_SERVICE_INFER,
                        model=model,
                        version=int(version or 0),
                        input_items=items,
                        status=status,
                        latency_ms=(time.monotonic() - started) * 1000,
                    )
                )
            )
        return rpc.InferResponse(
            model=model_reference_pb2.ModelReference(
                model=model, version=int(result.model_version or 0)
            ),
            id=request_id,
            usage=usage_pb2.Usage(input_items=items),
            outputs=[_from_numpy(name, array) for name, array in result.outputs.items()],
        )

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
            return str(arm.version), experiment, arm.name
        alias = reference.alias if reference.WhichOneof("selector") == "alias" else ""
        return str(await self.directory.version(reference.model, alias)), None, ""

    @staticmethod
    def _sticky_value(experiment, key: pb.Key, context) -> str:  # type: ignore[no-untyped-def]
        """What keeps a caller on one arm: its key, or a header it sends."""
        if experiment.stickiness_key == "api_key":
            return key.id
        metadata = dict(context.invocation_metadata() or ())
        return str(metadata.get(f"x-mlmesh-{experiment.stickiness_key}", key.id))

    def _shadow_generate(
        self,
        experiment,
        inner,
        primary_text: str,  # type: ignore[no-untyped-def]
        primary_version: int,
        version: int,
    ) -> None:
        """Mirrors a finished generation to the shadow version off the caller's
        path; records whether the texts agree (same seed and settings)."""
        if self._shadows.locked():
            return
        mirrored = llm_rpc.GenerateRequest()
        mirrored.CopyFrom(inner)
        mirrored.model.CopyFrom(
            model_reference_pb2.ModelReference(model=inner.model.model, version=version)
        )
        mirrored.request_id = f"{inner.request_id}-shadow"

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
                    await self.ledger.record_shadow(
                        inner.request_id,
                        experiment.name,
                        inner.model.model,
                        primary_version,
                        version,
                        0.0 if agreed else 1.0,
                        agreed,
                    )
                except Exception as error:  # a shadow never affects the caller
                    log.warning("shadow of %s failed: %s", inner.request_id, error)

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
        if self._shadows.locked():
            return  # shadow traffic is best effort: never queue behind it

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
                    await self.ledger.record_shadow(
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
        if not 1 <= len(request.texts) <= 256:
            raise InvalidArgument.field("texts", "1 to 256 texts")
        request_id = uuid.uuid4().hex
        await self._admit_unary(key, request_id)
        texts = np.array([[text] for text in request.texts], dtype=object)
        result = await self._triton().infer(model, {"text": texts}, request_id=request_id)
        vectors = next(iter(result.outputs.values()))
        if request.normalize:
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
        await self.ledger.record(
            UsageEvent(
                request_id=request_id,
                key_id=key.id,
                service=pb.PLATFORM_SERVICE_EMBED,
                model=model,
                input_items=len(request.texts),
            )
        )
        return rpc.EmbedResponse(
            model=model_reference_pb2.ModelReference(
                model=model, version=int(result.model_version or 0)
            ),
            embeddings=[pb.Embedding(values=row.tolist()) for row in vectors],
            dimension=int(vectors.shape[1]),
            usage=usage_pb2.Usage(input_items=len(texts)),
        )

    async def _admit_unary(self, key: pb.Key, request_id: str) -> None:
        decision = await self.throttle.admit(
            f"key:{key.id}", request_id, 0, limits_of(key), stream=False
        )
        if not decision.admitted:
            raise over_limit(key, decision)

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


class UsageServicer(usage_service_pb2_grpc.UsageServiceServicer):
    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger

    async def GetUsage(self, request, context):  # type: ignore[no-untyped-def]
        if not request.HasField("start_time") or not request.HasField("end_time"):
            raise InvalidArgument.field("start_time", "start_time and end_time are required")
        start = request.start_time.ToDatetime(tzinfo=dt.UTC)
        end = request.end_time.ToDatetime(tzinfo=dt.UTC)
        if end <= start:
            raise InvalidArgument.field("end_time", "must be after start_time")
        buckets = await self.ledger.buckets(
            start, end, list(request.key_ids), list(request.models), request.granularity
        )
        page, token = offset_page(buckets, request.page_size, request.page_token)
        return usage_service_pb2.GetUsageResponse(buckets=page, next_page_token=token)


def over_limit(key: pb.Key, decision: Decision) -> ResourceExhausted:
    """The rejection for a throttle decision: QuotaFailure + RetryInfo."""
    return ResourceExhausted(
        f"key {key.id} is over its {decision.violated} limit",
        [QuotaViolation(f"key:{key.id}", decision.violated)],
        decision.retry_after_s,
        key_id=key.id,
        limit=decision.violated,
    )


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


def _to_numpy(tensor: pb.InferTensor, field: str) -> np.ndarray:
    try:
        dtype = np.dtype(triton_to_np_dtype(tensor.datatype))
    except TypeError as error:
        raise InvalidArgument.field(
            f"{field}.datatype", f"unknown type {tensor.datatype}"
        ) from error
    shape = tuple(int(d) for d in tensor.shape)
    if tensor.WhichOneof("contents") == "raw_contents":
        if tensor.datatype == "BYTES":
            raise InvalidArgument.field(f"{field}.raw_contents", "send BYTES as bytes_contents")
        array = np.frombuffer(tensor.raw_contents, dtype=dtype)
    else:
        values = list(getattr(tensor.values, _CONTENTS.get(tensor.datatype, "fp32_contents")))
        array = np.array(values, dtype=object if tensor.datatype == "BYTES" else dtype)
    if int(np.prod(shape)) != array.size:
        raise InvalidArgument.field(
            f"{field}.shape", f"{list(shape)} does not hold {array.size} values"
        )
    return array.reshape(shape)


def _from_numpy(name: str, array: np.ndarray) -> pb.InferTensor:
    from tritonclient.utils import np_to_triton_dtype

    return pb.InferTensor(
        name=name,
        datatype=np_to_triton_dtype(array.dtype),
        shape=list(array.shape),
        raw_contents=np.ascontiguousarray(array).tobytes(),
    )

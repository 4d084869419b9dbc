"""The OpenAI-compatible HTTP surface of the gateway, through Envoy's front
door beside the gRPC API:

- ``POST /v1/chat/completions`` (streamed as server-sent events, with
  ``stream_options.include_usage``), ``POST /v1/completions``,
  ``POST /v1/embeddings``, ``GET /v1/models`` and ``GET /v1/models/{id}``;
- ``GET /healthz`` for Envoy's health check.

It is another door to the same rooms. A request's body is read into the
gRPC contract's message and checked by the same rules
(``openai_requests``); the key is verified in process against the same key
view as every gRPC call (``Authorization: Bearer``); generations run through
``generation.Generation`` (admission, routing, A/B, shadows, the ledger) and
embeddings through the servicer's ``embed``; the span, request id and
metrics are the chassis' own, one per request.

Errors come in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with the HTTP status of the gRPC code (400, 401, 403, 404, 429,
503...) and the google.rpc details under ``error.mlmesh`` (reason, field and
quota violations, retry delay). A 429 or 503 carries ``Retry-After`` (whole
seconds, rounded up) and ``retry-after-ms`` (exact, which the official
clients prefer): the wait the throttle computed. Once a stream has started,
a failure ends it with an ``error`` event and no ``[DONE]``.

A client that goes away cancels its handler (``handler_cancellation``): the
backend call is cancelled and the unused reservation refunded, as for a
cancelled gRPC stream. Bodies are capped (``MAX_BODY_BYTES``) before they are
read, and a large one is parsed off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import orjson
from aiohttp import web
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.llm.v1 import llm_pb2
from mlmesh_chassis import metrics
from mlmesh_chassis.auth import (
    KeyView,
    LiveCalls,
    Principal,
    UnknownKey,
    bearer,
    principal_var,
)
from mlmesh_chassis.context import deadline_var, new_request_id, request_id_var
from mlmesh_chassis.errors import (
    FieldViolation,
    InvalidArgument,
    MlmeshError,
    NotFound,
    Reason,
    Unauthenticated,
    details_of,
    shorten,
)
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mlmesh_gateway.embeddings import vectors_of
from mlmesh_gateway.generate_messages import to_llm
from mlmesh_gateway.generation import Outcome
from mlmesh_gateway.openai_requests import (
    Parsed,
    chat_request,
    check_contract,
    completion_request,
    embedding_request,
)

log = logging.getLogger("mlmesh.gateway")
_tracer = trace.get_tracer("mlmesh.gateway.openai")

SERVICE = "gateway"
# A request body over this is refused before it is read (a 512 KiB prompt
# escaped as JSON, or a few images, fit).
MAX_BODY_BYTES = 4 * 1024 * 1024
# On shutdown, how long open requests and streams get before they are cut.
SHUTDOWN_GRACE_S = 5.0
# Bodies larger than this are parsed in a worker thread.
THREAD_PARSE_BYTES = 64 * 1024
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REGION = re.compile(r"[A-Za-z0-9._-]{1,63}")
FINISH = {
    llm_pb2.FINISH_REASON_STOP: "stop",
    llm_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
    llm_pb2.FINISH_REASON_LENGTH: "length",
}
HTTP_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "api_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
KIND_NAMES = {
    pb.MODEL_KIND_LLM: "llm",
    pb.MODEL_KIND_CLASSIC: "classic",
    pb.MODEL_KIND_EMBEDDING: "embedding",
}


class StreamEnded(Exception):
    """A stream that failed after it started: the error event was sent."""

    def __init__(self, response: web.StreamResponse, code: grpc.StatusCode) -> None:
        self.response = response
        self.code = code


# ---- errors ---------------------------------------------------------------------


def error_body(error: BaseException) -> tuple[int, dict[str, Any], dict[str, str], grpc.StatusCode]:
    """(HTTP status, OpenAI error JSON, headers, gRPC code) for a failure."""
    retry_after: float | None = None
    extra: dict[str, Any] = {}
    if isinstance(error, MlmeshError):
        code, message = error.code, error.message
        reason = Reason.Name(error.reason).removeprefix("ERROR_REASON_")
        extra = {"reason": reason, "domain": "mlmesh.gateway", "metadata": error.metadata}
        violations = getattr(error, "violations", [])
        if violations and hasattr(violations[0], "field"):
            extra["field_violations"] = [
                {"field": v.field, "description": v.description} for v in violations[:10]
            ]
        elif violations:
            extra["quota_violations"] = [
                {"subject": v.subject, "description": v.description} for v in violations[:10]
            ]
        retry_after = getattr(error, "retry_after_s", None)
        param = extra.get("field_violations", [{}])[0].get("field")
    elif isinstance(error, grpc.aio.AioRpcError):
        details = details_of(error)
        code, message = details.code, details.message
        param = None
        if details.error_info is not None:
            extra = {
                "reason": details.error_info.reason,
                "domain": details.error_info.domain,
                "metadata": dict(details.error_info.metadata),
            }
        if details.bad_request is not None and details.bad_request.field_violations:
            extra["field_violations"] = [
                {"field": v.field, "description": v.description}
                for v in details.bad_request.field_violations[:10]
            ]
            param = details.bad_request.field_violations[0].field
        if details.quota_failure is not None:
            extra["quota_violations"] = [
                {"subject": v.subject, "description": v.description}
                for v in details.quota_failure.violations[:10]
            ]
        if details.retry_info is not None:
            retry_after = details.retry_info.retry_delay.ToNanoseconds() / 1e9
    else:
        code, message, param = grpc.StatusCode.INTERNAL, "internal error", None
        extra = {"reason": "INTERNAL", "request_id": request_id_var.get()}
    status, kind = HTTP_OF_CODE.get(code, (500, "api_error"))
    headers: dict[str, str] = {}
    if retry_after is not None and status in (429, 503):
        extra["retry_after_s"] = round(retry_after, 3)
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        headers["retry-after-ms"] = str(max(0, round(retry_after * 1000)))
    body = {
        "error": {
            "message": shorten(message, 1024),
            "type": kind,
            "param": param,
            "code": str(extra.get("reason", "")).lower() or None,
            "mlmesh": extra,
        }
    }
    return status, body, headers, code


def error_response(error: BaseException) -> tuple[web.Response, grpc.StatusCode]:
    status, body, headers, code = error_body(error)
    return (
        web.Response(
            status=status, body=orjson.dumps(body), headers=headers, content_type="application/json"
        ),
        code,
    )


def _json(data: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json", headers=headers)


def _usage(outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


# ---- the surface ------------------------------------------------------------------


Work = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]


class OpenAIHttp:
    def __init__(self, gateway: Any, view: KeyView) -> None:
        self.gateway = gateway  # the GatewayServicer: generation, embed, catalog
        self.view = view
        # Open streams, ended when their key stops authenticating (revoked,
        # expired): as the chassis does for gRPC streams.
        self.live = LiveCalls(view)
        self.runner: web.AppRunner | None = None
        self.serving = False
        # The metrics' children, looked up once per label set (labels() is
        # a locked dict lookup per call).
        self._in_flight = metrics.RPC_IN_FLIGHT.labels(SERVICE)
        self._requests: dict[tuple[str, str], Any] = {}
        self._durations: dict[str, Any] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/chat/completions", self._route(self.chat, "chat/completions"))
        app.router.add_post("/v1/completions", self._route(self.completions, "completions"))
        app.router.add_post("/v1/embeddings", self._route(self.embeddings, "embeddings"))
        app.router.add_get("/v1/models", self._route(self.models, "models"))
        app.router.add_get("/v1/models/{model}", self._route(self.model, "models/{model}"))
        app.router.add_get("/healthz", self.health)
        return app

    async def start(self, host: str, port: int) -> int:
        # A client that disconnects cancels its handler: the backend call
        # ends and the reservation is refunded.
        self.runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            access_log=None,
            # On shutdown, streams still open get this long to finish.
            shutdown_timeout=SHUTDOWN_GRACE_S,
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, backlog=1024)
        await site.start()
        self.serving = True
        return int(self.runner.addresses[0][1])  # the port bound (port 0: any free one)

    async def close(self) -> None:
        """Stops taking requests (health 503 at once), lets open ones finish
        for up to SHUTDOWN_GRACE_S, then cuts them (their calls settle)."""
        self.serving = False
        if self.runner is not None:
            await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.serving else 503, text="ok")

    def _route(
        self, work: Work, name: str
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        method = f"{'GET' if name.startswith('models') else 'POST'} /v1/{name}"

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, method, work)

        return handle

    async def _serve(self, request: web.Request, method: str, work: Work) -> web.StreamResponse:
        """One request in the chassis' per-call context: span, request id,
        verified caller, metrics (the same series as gRPC calls)."""
        started = time.perf_counter()
        given = request.headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else new_request_id()
        span = _tracer.start_span(
            method,
            context=propagate.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "url.path": request.path[:256],
                "mlmesh.request_id": request_id,
            },
        )
        # aiohttp serves a keep-alive connection's requests in one task: every
        # contextvar set here is reset before the next request.
        tokens = (
            otel_context.attach(trace.set_span_in_context(span)),
            request_id_var.set(request_id),
            deadline_var.set(None),
        )
        principal_token = None
        self._in_flight.inc()
        code = grpc.StatusCode.OK
        response: web.StreamResponse
        try:
            principal = await self._authenticate(request)
            principal_token = principal_var.set(principal)
            span.set_attribute("mlmesh.key_id", principal.key_id)
            response = await work(request, principal)
        except StreamEnded as ended:
            code, response = ended.code, ended.response
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except (MlmeshError, grpc.aio.AioRpcError) as error:
            response, code = error_response(error)
            if code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                log.info("%s failed: %s %s", method, code.name, str(error)[:200])
        except Exception as error:
            log.exception("unhandled error in %s", method)
            response, code = error_response(error)
        finally:
            self._in_flight.dec()
            self._observe(method, code, time.perf_counter() - started)
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()
            if principal_token is not None:
                principal_var.reset(principal_token)
            deadline_var.reset(tokens[2])
            request_id_var.reset(tokens[1])
            otel_context.detach(tokens[0])
        if not response.prepared:  # a stream sent its headers already (with the id)
            response.headers["x-request-id"] = request_id
        return response

    def _observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """The same series as a gRPC call's (``method`` is one of the routes')."""
        counter = self._requests.get((method, code.name))
        if counter is None:
            counter = self._requests[method, code.name] = metrics.RPC_REQUESTS.labels(
                SERVICE, method, code.name
            )
        counter.inc()
        duration = self._durations.get(method)
        if duration is None:
            duration = self._durations[method] = metrics.RPC_DURATION.labels(SERVICE, method)
        duration.observe(seconds)

    async def _authenticate(self, request: web.Request) -> Principal:
        secret = bearer(request.headers.get("authorization", ""))
        try:
            return self.view.verify(secret)
        except UnknownKey as unknown:
            await self.view.catch_up(unknown.key_id)
            return self.view.verify(secret)

    async def _parsed(self, request: web.Request, read: Callable[[Any], Parsed]) -> Parsed:
        """The body, capped before it is read, parsed and read into the
        contract's message (``read``); a large one (images, long prompts)
        off the event loop."""
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise _too_large()
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge as error:
            raise _too_large() from error

        def parse() -> Parsed:
            try:
                body = orjson.loads(data)
            except orjson.JSONDecodeError as error:
                raise _invalid_json(error) from error
            return read(body)

        if len(data) > THREAD_PARSE_BYTES:
            return await asyncio.to_thread(parse)
        return parse()

    def _region(self, request: web.Request) -> str:
        region = request.headers.get("x-mlmesh-region", "")
        return region if REGION.fullmatch(region) else ""

    # ---- generation ---------------------------------------------------------------

    async def chat(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        upstreams, region = self.gateway.generation.upstreams, self._region(request)
        parsed = await self._parsed(request, lambda body: chat_request(body, upstreams, region))
        return await self._generate(request, principal, parsed, chat=True)

    async def completions(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        upstreams, region = self.gateway.generation.upstreams, self._region(request)
        parsed = await self._parsed(
            request, lambda body: completion_request(body, upstreams, region)
        )
        return await self._generate(request, principal, parsed, chat=False)

    async def _generate(
        self, request: web.Request, principal: Principal, parsed: Parsed, *, chat: bool
    ) -> web.StreamResponse:
        await check_contract(parsed)
        inner = to_llm(parsed.message)
        outcome = Outcome()
        stream = self.gateway.generation.stream(
            principal.key,
            inner,
            parsed.message.region,
            parsed.headers,
            outcome=outcome,
            operation="chat" if chat else "text_completion",
            whole=not parsed.stream,
        )
        created = int(time.time())
        if not parsed.stream:
            return await self._complete(stream, outcome, parsed, created, chat)
        live = self.live.add(principal)
        state: dict[str, web.StreamResponse] = {}
        try:
            return await self._relay(request, stream, outcome, parsed, created, chat, state)
        except asyncio.CancelledError:
            started = state.get("response")
            if live.ended_because is None or started is None:
                raise  # the client went away, or the server is stopping
            # The key stopped authenticating mid-stream: the stream ends with
            # an error event, as a gRPC stream ends with UNAUTHENTICATED.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            ended = Unauthenticated(
                f"the stream's key stopped authenticating: {live.ended_because}"
            )
            with contextlib.suppress(ConnectionError):
                await started.write(b"data: " + orjson.dumps(error_body(ended)[1]) + b"\n\n")
            raise StreamEnded(started, grpc.StatusCode.UNAUTHENTICATED) from None
        finally:
            live.done = True
            self.live.discard(live)

    async def _complete(
        self, stream: Any, outcome: Outcome, parsed: Parsed, created: int, chat: bool
    ) -> web.Response:
        text: list[str] = []
        finish = "stop"
        region = ""
        try:
            async for endpoint, chunk in stream:
                region = endpoint.region
                text.append(chunk.text)
                if chunk.finish_reason:
                    finish = FINISH.get(chunk.finish_reason, "stop")
        finally:
            await stream.aclose()
        body: dict[str, Any]
        if chat:
            body = {
                "id": f"chatcmpl-{outcome.call_id}",
                "object": "chat.completion",
                "created": created,
                "model": parsed.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(text)},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(outcome),
            }
        else:
            body = {
                "id": f"cmpl-{outcome.call_id}",
                "object": "text_completion",
                "created": created,
                "model": parsed.model,
                "choices": [
                    {"index": 0, "text": "".join(text), "finish_reason": finish, "logprobs": None}
                ],
                "usage": _usage(outcome),
            }
        return _json(body, {"x-mlmesh-region": region})

    async def _relay(
        self,
        request: web.Request,
        stream: Any,
        outcome: Outcome,
        parsed: Parsed,
        created: int,
        chat: bool,
        state: dict[str, web.StreamResponse],
    ) -> web.StreamResponse:
        """Server-sent events, one per chunk. The response starts with the
        first chunk, so a refusal before it (a limit, an unknown model) is
        still a plain HTTP error."""
        response: web.StreamResponse | None = None
        model = orjson.dumps(parsed.model)
        usage_null = b',"usage":null' if parsed.include_usage else b""
        head = b""
        try:
            async for endpoint, chunk in stream:
                if response is None:
                    response = web.StreamResponse(
                        headers={
                            "content-type": "text/event-stream",
                            "cache-control": "no-cache",
                            "x-mlmesh-region": endpoint.region,
                            "x-request-id": request_id_var.get(),
                        }
                    )
                    await response.prepare(request)
                    state["response"] = response
                    object_ = b"chat.completion.chunk" if chat else b"text_completion"
                    prefix = "chatcmpl-" if chat else "cmpl-"
                    head = (
                        b'data: {"id":"'
                        + f"{prefix}{outcome.call_id}".encode()
                        + b'","object":"'
                        + object_
                        + b'","created":'
                        + str(created).encode()
                        + b',"model":'
                        + model
                        + b',"choices":[{"index":0,'
                    )
                    if chat:  # the first delta names the role
                        await response.write(
                            head + b'"delta":{"role":"assistant","content":""},'
                            b'"logprobs":null,"finish_reason":null}]' + usage_null + b"}\n\n"
                        )
                finish = (
                    b'"' + FINISH.get(chunk.finish_reason, "stop").encode() + b'"'
                    if chunk.finish_reason
                    else b"null"
                )
                if not chunk.text and not chunk.finish_reason:
                    continue
                text = orjson.dumps(chunk.text)
                payload = (
                    b'"delta":{"content":' + text + b"}," if chat else b'"text":' + text + b","
                )
                await response.write(
                    head
                    + payload
                    + b'"logprobs":null,"finish_reason":'
                    + finish
                    + b"}]"
                    + usage_null
                    + b"}\n\n"
                )
        except (MlmeshError, grpc.aio.AioRpcError) as error:
            if response is None:
                raise
            _, body, _, code = error_body(error)
            with contextlib.suppress(ConnectionError):
                await response.write(b"data: " + orjson.dumps(body) + b"\n\n")
            log.info("stream ended by %s: %s", code.name, str(error)[:200])
            raise StreamEnded(response, code) from error
        except ConnectionError as gone:  # the client went away mid-stream
            assert response is not None
            raise StreamEnded(response, grpc.StatusCode.CANCELLED) from gone
        finally:
            await stream.aclose()  # settles the call now: refund, ledger, backend cancelled
        if response is None:  # nothing was generated (an empty answer)
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
        if parsed.include_usage:
            object_name = "chat.completion.chunk" if chat else "text_completion"
            final = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{outcome.call_id}",
                "object": object_name,
                "created": created,
                "model": parsed.model,
                "choices": [],
                "usage": _usage(outcome),
            }
            await response.write(b"data: " + orjson.dumps(final) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # ---- embeddings and models ------------------------------------------------------

    async def embeddings(self, request: web.Request, principal: Principal) -> web.Response:
        parsed = await self._parsed(request, embedding_request)
        await check_contract(parsed)
        message = parsed.message
        texts = list(message.texts)
        embedded = await self.gateway.embed(principal.key, message.model, texts, {})
        vectors = await asyncio.to_thread(vectors_of, embedded.outputs, True)
        data = []
        for i, row in enumerate(np.asarray(vectors, dtype=np.float32)):
            value: Any = (
                base64.b64encode(row.astype("<f4").tobytes()).decode()
                if parsed.encoding_format == "base64"
                else row.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = embedded.prompt_tokens
        return _json(
            {
                "object": "list",
                "data": data,
                "model": parsed.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _describe(self, model: pb.ServedModel) -> dict[str, Any]:
        return {
            "id": model.model,
            "object": "model",
            "created": 0,
            "owned_by": "mlmesh",
            "mlmesh": {
                "kind": KIND_NAMES.get(model.kind, "unknown"),
                "backend": pb.ModelBackend.Name(model.backend)
                .removeprefix("MODEL_BACKEND_")
                .lower(),
                "regions": list(model.regions),
                "capabilities": [
                    pb.ModelCapability.Name(c).removeprefix("MODEL_CAPABILITY_").lower()
                    for c in model.capabilities
                ],
            },
        }

    async def models(self, request: web.Request, principal: Principal) -> web.Response:
        visible = self.gateway.catalog.visible(principal.key)
        return _json({"object": "list", "data": [self._describe(m) for m in visible]})

    async def model(self, request: web.Request, principal: Principal) -> web.Response:
        name = request.match_info["model"]
        for model in self.gateway.catalog.visible(principal.key):
            if model.model == name:
                return _json(self._describe(model))
        # Not there, or not for this key: the same answer either way.
        raise NotFound("model", name, f"model {name!r} is not served to this key")


def _too_large() -> MlmeshError:
    return InvalidArgument(
        f"the request body is over {MAX_BODY_BYTES} bytes",
        [FieldViolation("body", f"at most {MAX_BODY_BYTES} bytes")],
        max_body_bytes=MAX_BODY_BYTES,
    )


def _invalid_json(error: Exception) -> MlmeshError:
    return InvalidArgument(
        "the request body is not valid JSON", [FieldViolation("body", str(error)[:120])]
    )

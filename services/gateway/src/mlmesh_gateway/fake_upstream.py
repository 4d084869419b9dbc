"""A FAKE OpenAI-compatible upstream: a test and benchmark double, not a model.

It answers the parts of the OpenAI API the gateway calls on an upstream
(``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST
/v1/embeddings``, ``GET /v1/models``) in exactly OpenAI's shapes, streaming
included, with made-up text: every completion is ``"tok "`` repeated, one
token per SSE chunk. It exists for two reasons:

* tests need the faults a real server will not show on demand (latency, a
  429, a stream killed half-way, a missing ``usage``), so it has an admin
  endpoint that switches them on;
* the benchmarks (``bench/openai_gateway.py``) measure what a gateway adds
  over calling the backend directly, so the backend must cost next to
  nothing: the SSE chunk bytes are built once per request (and the token
  chunk once per model), JSON goes through orjson, and there is no access log.

Run it as a process::

    python -m mlmesh_gateway.fake_upstream --host 127.0.0.1 --port 0 \\
        --port-file F [--tokens 64] [--api-key K] [--models fake-64,other]

or in process from a test: ``fake = await start_fake(tokens=8)``, then
``fake.url`` (``http://127.0.0.1:PORT/v1``) and ``await fake.close()``.

Behaviour:

* Completions return ``tokens`` tokens, or ``max_tokens`` (chat also
  ``max_completion_tokens``) when smaller; ``finish_reason`` is ``length``
  when ``max_tokens`` cut it, else ``stop``. Usage: ``prompt_tokens`` is the
  number of whitespace-separated words in all message contents (chat) or in
  the prompt (completions; a list of token ids counts its length);
  ``completion_tokens`` the tokens sent.
* Streams follow OpenAI: a first chunk with ``delta.role``, one chunk per
  token with ``delta.content``, a chunk with the ``finish_reason``, and with
  ``stream_options.include_usage`` every chunk carries ``"usage": null`` and a
  last chunk has ``choices: []`` and the usage; then ``data: [DONE]``.
* Only the model names it was started with exist (default ``fake-64``);
  others get 404 ``model_not_found``.
* With an API key, requests without ``Authorization: Bearer <key>`` get 401
  (``invalid_api_key``). The admin endpoints take no key.
* Errors use OpenAI's JSON error shape ``{"error": {"message", "type",
  "param", "code"}}``.

Admin endpoints (for tests; not part of the OpenAI API):

* ``POST /_faults`` with a JSON object sets the fault plan for the next POST
  requests under ``/v1`` (it replaces any earlier plan): ``status`` (answer
  with this HTTP error), ``retry_after`` (seconds, sent as ``Retry-After``
  with ``status``), ``latency_ms`` (wait before the response starts),
  ``chunk_delay_ms`` (wait before each streamed chunk; a non-streaming answer
  waits tokens x this), ``kill_after_chunks`` (close the connection after
  this many SSE events, without ``[DONE]``; 0 on a non-streaming request:
  close without answering), ``omit_usage`` (no ``usage``, even if asked),
  ``times`` (how many requests it applies to; default: all, until reset).
  ``GET /_faults`` shows it, ``DELETE /_faults`` clears it.
* ``GET /_requests``: the last 100 requests under ``/v1`` (path, model,
  stream, include_usage, max_tokens, whether an Authorization header came
  and the SHA-256 hex of its value), the count per path, and
  ``disconnects``: streams whose caller went away before the end (a
  cancelled call reaching the upstream), since the start or the last
  ``DELETE /_requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import os
import signal
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

DEFAULT_TOKENS = 64
DEFAULT_MODELS = ("fake-64",)
TOKEN = "tok "
EMBEDDING_DIM = 8
REQUEST_LOG_SIZE = 100
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_TOKENS_LIMIT = 1_000_000
MAX_MODEL_NAME = 256
MAX_EMBEDDING_INPUTS = 2048
SYSTEM_FINGERPRINT = "fp_fake"
SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
JSON_TYPE = "application/json"

# Fault fields: name -> (type, lowest, highest).
_FAULT_FIELDS: dict[str, tuple[type, float, float]] = {
    "status": (int, 400, 599),
    "retry_after": (float, 0, 3600),
    "latency_ms": (float, 0, 600_000),
    "chunk_delay_ms": (float, 0, 60_000),
    "kill_after_chunks": (int, 0, MAX_TOKENS_LIMIT),
    "times": (int, 1, 1_000_000_000),
}
_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}

# A /v1 handler: (request, its JSON body ({} for GET), the fault plan that applies).
Handler = Callable[[web.Request, dict[str, Any], "FaultPlan | None"], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """A request the fake refuses with 400 (or ``status``), in OpenAI's shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclasses.dataclass
class FaultPlan:
    """What goes wrong on the next requests (see the module docstring)."""

    status: int | None = None
    retry_after: float | None = None
    latency_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    kill_after_chunks: int | None = None
    omit_usage: bool = False
    times: int | None = None  # None: every request until reset

    @classmethod
    def parse(cls, data: Any) -> FaultPlan:
        """Validates an admin request's JSON object; BadRequest if anything is off."""
        if not isinstance(data, dict):
            raise BadRequest("the fault plan must be a JSON object")
        unknown = set(data) - set(_FAULT_FIELDS) - {"omit_usage"}
        if unknown:
            raise BadRequest(f"unknown fault fields: {sorted(unknown)[:10]}")
        values: dict[str, Any] = {}
        for name, (kind, low, high) in _FAULT_FIELDS.items():
            value = data.get(name)
            if value is None:
                continue
            ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
            if isinstance(value, bool) or not ok_type or not low <= value <= high:
                raise BadRequest(f"{name} must be a {kind.__name__} in [{low}, {high}]")
            values[name] = kind(value)
        omit = data.get("omit_usage", False)
        if not isinstance(omit, bool):
            raise BadRequest("omit_usage must be true or false")
        values["omit_usage"] = omit
        return cls(**values)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    kind, code = _ERROR_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(status, message, param),
        content_type=JSON_TYPE,
        headers=headers,
    )


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def chat_prompt_tokens(messages: Sequence[Any]) -> int:
    """Whitespace words in every message's content (strings or text parts)."""
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += _words(content)
        elif isinstance(content, list):
            total += sum(_words(part.get("text")) for part in content if isinstance(part, dict))
    return total


def completion_prompt_tokens(prompt: Any) -> int:
    """Words of a string prompt or of a list of them; a token-id list counts its length."""
    if isinstance(prompt, str):
        return _words(prompt)
    if isinstance(prompt, list):
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return len(prompt)
        return sum(completion_prompt_tokens(p) for p in prompt)
    return 0


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@dataclasses.dataclass(frozen=True)
class _Kind:
    """The per-endpoint differences between chat and (legacy) completions."""

    id_prefix: str
    object_full: str
    object_chunk: str
    chat: bool


CHAT = _Kind("chatcmpl-fake", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = _Kind("cmpl-fake", "text_completion", "text_completion", chat=False)


def _choice(kind: _Kind, text: str | None, finish: str | None, role: bool = False) -> bytes:
    """One streamed ``choices`` array (bytes, to splice into a chunk)."""
    if kind.chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish,
        }
    else:
        choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
    return orjson.dumps([choice])


class FakeUpstream:
    """The fake's state and handlers; ``start_fake`` serves it."""

    def __init__(
        self,
        tokens: int = DEFAULT_TOKENS,
        api_key: str | None = None,
        models: Sequence[str] = DEFAULT_MODELS,
    ) -> None:
        if not 1 <= tokens <= MAX_TOKENS_LIMIT:
            raise ValueError(f"tokens must be in [1, {MAX_TOKENS_LIMIT}]")
        self.tokens = tokens
        self.api_key = api_key or None
        self.models = tuple(models)
        self.faults = FaultPlan()
        self.requests: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=REQUEST_LOG_SIZE
        )
        self.counts: collections.Counter[str] = collections.Counter()
        self.disconnects = 0  # streams whose caller went away before the end
        self.url = ""
        self.port = 0
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._created = int(time.time())
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": self._created, "owned_by": "fake"}
                    for m in self.models
                ],
            }
        )
        # The pieces of every streamed chunk after the per-request head, built once.
        self._pieces = {kind.chat: self._stream_pieces(kind) for kind in (CHAT, TEXT)}
        self._texts: dict[int, str] = {}

    # --- serving ---------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/chat/completions", self._guarded(self._chat))
        app.router.add_post("/v1/completions", self._guarded(self._completions))
        app.router.add_post("/v1/embeddings", self._guarded(self._embeddings))
        app.router.add_get("/v1/models", self._guarded(self._list_models))
        app.router.add_get("/_faults", self._get_faults)
        app.router.add_post("/_faults", self._set_faults)
        app.router.add_delete("/_faults", self._reset_faults)
        app.router.add_get("/_requests", self._get_requests)
        app.router.add_delete("/_requests", self._reset_requests)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        bound = self._runner.addresses[0]
        self.port = int(bound[1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/v1"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- test helpers (in process) ----------------------------------------------

    def set_faults(self, **fields: Any) -> FaultPlan:
        self.faults = FaultPlan.parse(fields)
        return self.faults

    def reset(self) -> None:
        """Clears the fault plan and the request log."""
        self.faults = FaultPlan()
        self.requests.clear()
        self.counts.clear()
        self.disconnects = 0

    # --- plumbing ---------------------------------------------------------------

    def _guarded(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Reads and logs the request, checks the key, applies the fault plan."""

        async def run(request: web.Request) -> web.StreamResponse:
            body: Any = None
            problem: BadRequest | None = None
            if request.method == "POST":
                try:
                    body = orjson.loads(await request.read())
                    if not isinstance(body, dict):
                        raise BadRequest("the request body must be a JSON object")
                except orjson.JSONDecodeError:
                    problem = BadRequest("the request body is not valid JSON")
                except BadRequest as error:
                    problem = error
                except web.HTTPRequestEntityTooLarge:
                    problem = BadRequest("the request body is too large", status=413)
            self._log(request, body if isinstance(body, dict) else {})
            if self.api_key is not None and not self._authorized(request):
                return error_response(401, "Incorrect API key provided.")
            if problem is not None:
                return error_response(problem.status, str(problem), problem.param)
            plan = self._take_faults() if request.method == "POST" else None
            if plan is not None:
                if plan.latency_ms:
                    await asyncio.sleep(plan.latency_ms / 1000)
                if plan.status is not None:
                    headers = None
                    if plan.retry_after is not None:
                        headers = {"Retry-After": _seconds(plan.retry_after)}
                    return error_response(plan.status, "fault injected by the fake", None, headers)
            try:
                return await handler(request, body if isinstance(body, dict) else {}, plan)
            except BadRequest as error:
                return error_response(error.status, str(error), error.param)

        return run

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        expected = f"Bearer {self.api_key}"
        return hmac.compare_digest(header.encode(), expected.encode())

    def _take_faults(self) -> FaultPlan | None:
        plan = self.faults
        if plan == FaultPlan():
            return None
        if plan.times is not None:
            left = plan.times - 1
            self.faults = dataclasses.replace(plan, times=left) if left > 0 else FaultPlan()
        return plan

    def _log(self, request: web.Request, body: dict[str, Any]) -> None:
        auth = request.headers.get("Authorization")
        options = body.get("stream_options")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        model = body.get("model")
        self.counts[request.path] += 1
        self.requests.append(
            {
                "path": request.path,
                "method": request.method,
                "model": model[:MAX_MODEL_NAME] if isinstance(model, str) else None,
                "stream": body.get("stream") is True,
                "include_usage": isinstance(options, dict) and options.get("include_usage") is True,
                "max_tokens": max_tokens if isinstance(max_tokens, int) else None,
                "authorization": auth is not None,
                "authorization_sha256": hashlib.sha256(auth.encode()).hexdigest()
                if auth is not None
                else None,
                "at": time.time(),
            }
        )

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_NAME:
            raise BadRequest("model must be a non-empty string", param="model")
        if model not in self.models:
            raise BadRequest(f"The model `{model}` does not exist.", status=404, param="model")
        return model

    def _count(self, body: dict[str, Any], *names: str) -> tuple[int, str]:
        """(tokens to send, finish reason): self.tokens ("stop"), or the
        caller's limit when it is not larger ("length")."""
        for name in names:
            value = body.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadRequest(f"{name} must be an integer >= 1", param=name)
            if value <= self.tokens:
                return value, "length"
            break
        return self.tokens, "stop"

    def _text(self, n: int) -> str:
        text = self._texts.get(n)
        if text is None:
            text = self._texts[n] = TOKEN * n
        return text

    def _stream_pieces(self, kind: _Kind) -> dict[str, bytes]:
        """Chunk tails (after the head's comma): role, token, finish per reason."""
        pieces = {
            "token": b'"choices":' + _choice(kind, TOKEN, None),
            "role": b'"choices":' + _choice(kind, "", None, role=True),
            "stop": b'"choices":' + _choice(kind, None if kind.chat else "", "stop"),
            "length": b'"choices":' + _choice(kind, None if kind.chat else "", "length"),
        }
        return pieces

    # --- handlers ---------------------------------------------------------------

    async def _chat(
        self, request: web.Request, body: dict[str, Any], plan: FaultPlan | None
    ) -> web.StreamResponse:
        model = self._model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty array", param="messages")
        n, finish = self._count(body, "max_completion_tokens", "max_tokens")
        prompt = chat_prompt_tokens(messages)
        return await self._generate(request, plan, CHAT, body, model, prompt, n, finish)

    async def _completions(
        self, request: web.Request, body: dict[str, Any], plan: FaultPlan | None
    ) -> web.StreamResponse:
        model = self._model(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list):
            raise BadRequest("prompt must be a string or an array", param="prompt")
        n, finish = self._count(body, "max_tokens")
        prompt_tokens = completion_prompt_tokens(prompt)
        return await self._generate(request, plan, TEXT, body, model, prompt_tokens, n, finish)

    async def _generate(
        self,
        request: web.Request,
        plan: FaultPlan | None,
        kind: _Kind,
        body: dict[str, Any],
        model: str,
        prompt: int,
        n: int,
        finish: str,
    ) -> web.StreamResponse:
        created = int(time.time())
        ident = f"{kind.id_prefix}{next(self._ids):08x}"
        omit_usage = plan is not None and plan.omit_usage
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = (
                isinstance(options, dict) and options.get("include_usage") is True
            ) and not omit_usage
            return await self._stream(
                request, kind, ident, created, model, prompt, n, finish, include_usage, plan
            )
        if plan is not None:
            if plan.kill_after_chunks is not None:
                _kill(request)
                return web.Response(status=500)  # never sent: the connection is gone
            if plan.chunk_delay_ms:
                await asyncio.sleep(plan.chunk_delay_ms * n / 1000)
        text = self._text(n)
        if kind.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        reply: dict[str, Any] = {
            "id": ident,
            "object": kind.object_full,
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [choice],
        }
        if not omit_usage:
            reply["usage"] = _usage(prompt, n)
        return web.Response(body=orjson.dumps(reply), content_type=JSON_TYPE)

    async def _stream(
        self,
        request: web.Request,
        kind: _Kind,
        ident: str,
        created: int,
        model: str,
        prompt: int,
        n: int,
        finish: str,
        include_usage: bool,
        plan: FaultPlan | None,
    ) -> web.StreamResponse:
        head = (
            b'data: {"id":"'
            + ident.encode()
            + b'","object":"'
            + kind.object_chunk.encode()
            + b'","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"system_fingerprint":"'
            + SYSTEM_FINGERPRINT.encode()
            + b'",'
        )
        tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        pieces = self._pieces[kind.chat]
        events: list[bytes] = []
        if kind.chat:
            events.append(head + pieces["role"] + tail)
        token_event = head + pieces["token"] + tail
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        delay = plan.chunk_delay_ms / 1000 if plan is not None else 0.0
        kill_at = plan.kill_after_chunks if plan is not None else None
        sent = 0

        async def send(event: bytes) -> bool:
            nonlocal sent
            if kill_at is not None and sent >= kill_at:
                _kill(request)
                return False
            if delay:
                await asyncio.sleep(delay)
            await response.write(event)
            sent += 1
            return True

        async def send_all() -> None:
            for event in events:
                if not await send(event):
                    return
            for _ in range(n):
                if not await send(token_event):
                    return
            if not await send(head + pieces[finish] + tail):
                return
            if include_usage:
                usage = orjson.dumps(_usage(prompt, n))
                if not await send(head + b'"choices":[],"usage":' + usage + b"}\n\n"):
                    return
            if kill_at is not None and sent >= kill_at:
                _kill(request)
                return
            await response.write(SSE_DONE)
            await response.write_eof()

        try:
            await send_all()
        except ConnectionResetError:
            # The caller went away mid-stream (a cancelled call): counted, so
            # a test can check that a cancel reached the upstream.
            self.disconnects += 1
        return response

    async def _embeddings(
        self, request: web.Request, body: dict[str, Any], plan: FaultPlan | None
    ) -> web.StreamResponse:
        model = self._model(body)
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_EMBEDDING_INPUTS:
            raise BadRequest(
                f"input must be a string or an array of 1 to {MAX_EMBEDDING_INPUTS}",
                param="input",
            )
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest("encoding_format must be float or base64", param="encoding_format")
        data = []
        tokens = 0
        for index, item in enumerate(inputs):
            tokens += completion_prompt_tokens(item)
            vector = _embedding(item)
            value: Any = (
                base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vector)).decode()
                if encoding == "base64"
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": value})
        reply: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if plan is None or not plan.omit_usage:
            reply["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.Response(body=orjson.dumps(reply), content_type=JSON_TYPE)

    async def _list_models(
        self, request: web.Request, body: dict[str, Any], plan: FaultPlan | None
    ) -> web.StreamResponse:
        return web.Response(body=self._models_body, content_type=JSON_TYPE)

    # --- admin ------------------------------------------------------------------

    async def _get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.faults.as_json())

    async def _set_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            raw = await request.read()
            self.faults = FaultPlan.parse(orjson.loads(raw))
        except orjson.JSONDecodeError:
            return error_response(400, "the fault plan is not valid JSON")
        except BadRequest as error:
            return error_response(400, str(error))
        return web.json_response(self.faults.as_json())

    async def _reset_faults(self, request: web.Request) -> web.StreamResponse:
        self.faults = FaultPlan()
        return web.json_response(self.faults.as_json())

    async def _get_requests(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=orjson.dumps(
                {
                    "requests": list(self.requests),
                    "counts": dict(self.counts),
                    "disconnects": self.disconnects,
                }
            ),
            content_type=JSON_TYPE,
        )

    async def _reset_requests(self, request: web.Request) -> web.StreamResponse:
        self.requests.clear()
        self.counts.clear()
        self.disconnects = 0
        return web.json_response({"requests": [], "counts": {}, "disconnects": 0})


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _kill(request: web.Request) -> None:
    """Drops the connection at once (no [DONE], no end of the chunked body)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _embedding(item: Any) -> list[float]:
    """A deterministic unit-ish vector from the input's bytes."""
    digest = hashlib.sha256(orjson.dumps(item)).digest()
    return [(b - 127.5) / 127.5 for b in digest[:EMBEDDING_DIM]]


async def start_fake(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tokens: int = DEFAULT_TOKENS,
    api_key: str | None = None,
    models: Sequence[str] = DEFAULT_MODELS,
) -> FakeUpstream:
    """Starts a fake on ``host:port`` (0: any free port) in this event loop."""
    fake = FakeUpstream(tokens=tokens, api_key=api_key, models=models)
    await fake.start(host, port)
    return fake


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mlmesh_gateway.fake_upstream",
        description="A FAKE OpenAI-compatible server for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port here")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens per completion")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("FAKE_UPSTREAM_API_KEY") or None,
        help="require Authorization: Bearer KEY (default $FAKE_UPSTREAM_API_KEY; none: open)",
    )
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names"
    )
    parser.add_argument(
        "--no-uvloop", action="store_true", help="use asyncio's own loop even if uvloop is there"
    )
    args = parser.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.model_list or any(len(m) > MAX_MODEL_NAME for m in args.model_list):
        parser.error("--models needs 1 or more names of at most 256 characters")
    if not 1 <= args.tokens <= MAX_TOKENS_LIMIT:
        parser.error(f"--tokens must be in [1, {MAX_TOKENS_LIMIT}]")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be in [0, 65535]")
    return args


async def _serve(args: argparse.Namespace) -> None:
    fake = await start_fake(
        host=args.host,
        port=args.port,
        tokens=args.tokens,
        api_key=args.api_key,
        models=args.model_list,
    )
    try:
        if args.port_file is not None:
            partial = args.port_file.with_name(args.port_file.name + ".tmp")
            partial.write_text(str(fake.port))
            partial.replace(args.port_file)  # readers never see a half-written file
        print(f"fake OpenAI upstream at {fake.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await fake.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    runner: Callable[..., Any] = asyncio.run
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
    runner(_serve(args))


if __name__ == "__main__":
    main()

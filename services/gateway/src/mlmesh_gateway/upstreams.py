"""OpenAI-compatible upstreams: a `vllm serve` fleet or a hosted provider
behind a gateway model name.

A model the gateway serves is backed by the llm service (gRPC) or, when
``MLMESH_GATEWAY_OPENAI_UPSTREAMS`` names it, by OpenAI-compatible servers:

    {"tiny-llama-vllm": {"endpoints": ["eu=http://10.0.0.5:8000/v1", ...],
                         "upstream_model": "tiny-llama",
                         "api_key_file": "/run/secrets/vllm-key",
                         "tokenizer": "tiny-llama"}}

- ``endpoints``: ``region=base URL`` (http or https; region may be left out);
- ``upstream_model``: the name the upstream knows (default: the same);
- ``api_key_file``: a file holding the upstream's own credential, sent as
  ``Authorization: Bearer``; re-read when the file changes (rotation), never
  logged, never echoed;
- ``tokenizer``: the registry model whose tokenizer counts prompt tokens for
  admission ("" when none is held: a byte bound is reserved instead).

Each endpoint gets an ``OpenAIStub`` that looks to ``LlmRouter`` like an
llm replica's stub: ``Generate(request, metadata=, timeout=)`` returns a call
that yields the llm's ``GenerateResponse`` chunks and can be cancelled. So
the same balancer ranks the endpoints (region first, time to first token,
spill-over), the same router retries before the first token and ejects
failing endpoints, and the same admission meters the tokens.

The request is sent as a streamed chat or text completion with
``stream_options.include_usage``; the upstream's ``usage`` (when it sends
one) is the bill, otherwise the gateway's own count. Upstream failures map
to domain errors: refused connections, 5xx, a stream cut before ``[DONE]``
and 429 (with its Retry-After) are retryable on another endpoint before the
first token; the upstream refusing the request itself (400/413/422) is the
caller's mistake; the upstream refusing the gateway's credential (401/403)
or not knowing the model (404) is the operator's, and is UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from mlmesh.common.v1 import usage_pb2
from mlmesh.llm.v1 import llm_pb2
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_chassis.errors import (
    FieldViolation,
    InvalidArgument,
    MlmeshError,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
)
from mlmesh_chassis.generation import max_tokens_of
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlmesh_gateway.prompt_tokens import ROLES

log = logging.getLogger("mlmesh.gateway")

MODEL_NAME = re.compile(r"[a-z][a-z0-9-]{1,62}")  # a registry-style name (the contract's)
REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
URL = re.compile(r"https?://[^\s/?#]+(/[^\s?#]*)?")
# An upstream's error body is read up to this many bytes; its message is
# echoed to the caller up to ECHO (it may be the caller's own mistake).
MAX_ERROR_BODY = 64 * 1024
ECHO = 200
# Longest SSE line accepted from an upstream (a chunk is a few hundred bytes),
# and longest whole (non-streamed) answer.
MAX_LINE = 1024 * 1024
MAX_WHOLE_BODY = 16 * 1024 * 1024
CONNECT_TIMEOUT_S = 2.0
# Longest silence from a streaming upstream before it counts as failed (no
# caller deadline bounds an HTTP caller's stream otherwise).
READ_TIMEOUT_S = 120.0
FINISH = {
    "stop": llm_pb2.FINISH_REASON_STOP,
    "length": llm_pb2.FINISH_REASON_LENGTH,
}


class UpstreamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[str] = Field(min_length=1, max_length=64)
    upstream_model: str = ""
    api_key_file: Path | None = None
    tokenizer: str = ""

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, values: list[str]) -> list[str]:
        for value in values:
            region, _, url = value.rpartition("=")
            if (region and not REGION.fullmatch(region)) or not URL.fullmatch(url):
                raise ValueError(
                    f"endpoint {value[:80]!r} is not [region=]http(s)://host[:port]/path"
                )
        return values


@dataclass(frozen=True)
class Upstream:
    """One gateway model served by OpenAI-compatible endpoints."""

    model: str
    endpoints: tuple[tuple[str, str], ...]  # (region, base URL without a trailing /)
    upstream_model: str
    api_key_file: Path | None
    tokenizer: str


def parse_upstreams(value: str) -> dict[str, Upstream]:
    """The setting's JSON, checked (ValueError says what is wrong)."""
    if not value.strip():
        return {}
    raw = orjson.loads(value)
    if not isinstance(raw, dict):
        raise ValueError("MLMESH_GATEWAY_OPENAI_UPSTREAMS must be a JSON object of model -> spec")
    upstreams = {}
    for model, body in raw.items():
        if not MODEL_NAME.fullmatch(model):
            raise ValueError(f"upstream model name {model[:80]!r} is not {MODEL_NAME.pattern}")
        spec = UpstreamSpec.model_validate(body)
        endpoints = []
        for entry in spec.endpoints:
            region, _, url = entry.rpartition("=")
            endpoints.append((region or "default", url.rstrip("/")))
        upstreams[model] = Upstream(
            model,
            tuple(endpoints),
            spec.upstream_model or model,
            spec.api_key_file,
            spec.tokenizer,
        )
    return upstreams


class Credential:
    """The upstream's secret, read from its file, again whenever the file
    changes (an operator rotates it by replacing the file)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._header: str | None = None

    def header(self) -> str | None:
        if self.path is None:
            return None
        try:
            stat = os.stat(self.path)
        except OSError:
            log.error("the upstream credential file %s cannot be read", self.path)
            return self._header
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            secret = self.path.read_text().strip()
            self._header = f"Bearer {secret}" if secret else None
            self._stamp = stamp
        return self._header


def request_body(
    request: llm_rpc.GenerateRequest, upstream_model: str, *, stream: bool = True
) -> tuple[str, bytes]:
    """(path, JSON body) of the completion for an llm request: streamed, or
    whole (the caller wants the whole answer: one response to parse instead
    of an event per token)."""
    if request.images:
        raise InvalidArgument(
            "this model's upstream takes no images",
            [FieldViolation("images", "not accepted by an OpenAI-compatible upstream")],
        )
    sampling = request.sampling
    body: dict[str, Any] = {"model": upstream_model, "max_tokens": max_tokens_of(sampling)}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if sampling.HasField("temperature"):
        body["temperature"] = sampling.temperature
    if sampling.HasField("top_p"):
        body["top_p"] = sampling.top_p
    if sampling.HasField("top_k") and sampling.top_k > 0:
        body["top_k"] = sampling.top_k  # vLLM's extension; hosted providers may refuse it
    if sampling.HasField("seed"):
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if request.WhichOneof("prompt") == "chat":
        body["messages"] = [
            {"role": ROLES.get(m.role, "user"), "content": m.content} for m in request.chat.messages
        ]
        return "/chat/completions", orjson.dumps(body)
    body["prompt"] = request.text
    return "/completions", orjson.dumps(body)


def _retry_after(headers: Any, default: float) -> float:
    value = headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), 3600.0)
    except ValueError:
        return default


def _message(body: bytes) -> str:
    """The upstream's error message (OpenAI's shape), cut short."""
    try:
        parsed = orjson.loads(body)
        message = parsed.get("error", {}).get("message") or parsed.get("message") or ""
    except (orjson.JSONDecodeError, AttributeError):
        message = body.decode(errors="replace")
    return str(message)[:ECHO]


def status_error(status: int, headers: Any, body: bytes, endpoint: str) -> MlmeshError:
    """The domain error for an upstream's refusal."""
    message = _message(body)
    if status == 429:
        wait = _retry_after(headers, 1.0)
        return ResourceExhausted(
            f"the upstream is rate limited: {message}",
            [QuotaViolation(f"upstream:{endpoint}", "upstream rate limit")],
            wait,
            upstream_status=status,
        )
    if status in (400, 413, 422):
        return InvalidArgument(
            f"the upstream refused the request: {message}",
            [FieldViolation("request", message or f"upstream status {status}")],
            upstream_status=status,
        )
    if status in (401, 403):
        log.error("upstream %s refused the gateway's credential (%d)", endpoint, status)
        return Unavailable(
            "the upstream refused the gateway's credential; an operator must fix it",
            retry_after_s=30.0,
            upstream_status=status,
        )
    return Unavailable(
        f"the upstream failed with HTTP {status}: {message}",
        retry_after_s=_retry_after(headers, 1.0),
        upstream_status=status,
    )


class UpstreamCall:
    """One streamed completion, shaped like a gRPC server-streaming call."""

    def __init__(
        self,
        stub: OpenAIStub,
        request: llm_rpc.GenerateRequest,
        headers: dict[str, str],
        timeout: float | None,
        whole: bool = False,
    ) -> None:
        self._stub = stub
        self._whole = whole  # one JSON answer instead of a stream
        self._request = request
        self._headers = headers
        self._timeout = timeout
        self._response: aiohttp.ClientResponse | None = None

    def __aiter__(self) -> AsyncIterator[llm_rpc.GenerateResponse]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[llm_rpc.GenerateResponse]:
        stub = self._stub
        path, body = request_body(self._request, stub.upstream_model, stream=not self._whole)
        timeout = aiohttp.ClientTimeout(
            total=self._timeout, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
        )
        try:
            response = await stub.session.post(
                stub.base_url + path, data=body, headers=self._headers, timeout=timeout
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise Unavailable(
                f"the upstream cannot be reached: {type(error).__name__}",
                retry_after_s=1.0,
                upstream=stub.base_url,
            ) from error
        self._response = response
        try:
            if response.status != 200:
                data = await response.content.read(MAX_ERROR_BODY)
                raise status_error(response.status, response.headers, data, stub.base_url)
            if self._whole:
                yield _whole(orjson.loads(await _read_bounded(response)))
                return
            done = False
            buffer = b""
            # Events are split here, from whatever each read brought (one
            # read often holds several): aiohttp's per-line reads cost more
            # than the relay itself.
            async for data in response.content.iter_any():
                lines = (buffer + data).split(b"\n")
                buffer = lines.pop()
                if len(buffer) > MAX_LINE:
                    raise ValueError("an event line is too long")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # SSE comments, blank lines between events
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    chunk = _chunk(orjson.loads(payload))
                    if chunk is not None:
                        yield chunk
                if done:
                    break
            if not done:
                raise Unavailable("the upstream ended the stream before [DONE]", retry_after_s=1.0)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as error:
            raise Unavailable(
                f"the upstream stream broke: {type(error).__name__}", retry_after_s=1.0
            ) from error
        finally:
            response.release()

    async def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def cancel(self) -> None:
        """Closes the connection: the upstream sees the client go and aborts."""
        if self._response is not None and not self._response.closed:
            self._response.close()


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    parts, size = [], 0
    async for data in response.content.iter_any():
        size += len(data)
        if size > MAX_WHOLE_BODY:
            raise ValueError("the upstream's answer is too large")
        parts.append(data)
    return b"".join(parts)


def _copy_usage(event: dict[str, Any], response: llm_rpc.GenerateResponse) -> None:
    """The event's OpenAI ``usage``, when it has one, into ``response``."""
    usage = event.get("usage")
    if isinstance(usage, dict):
        response.usage.CopyFrom(
            usage_pb2.Usage(
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )
        )


def _whole(event: Any) -> llm_rpc.GenerateResponse:
    """The one llm chunk for a whole (non-streamed) completion."""
    if not isinstance(event, dict) or not event.get("choices"):
        raise ValueError("not a completion")
    choice = event["choices"][0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    response = llm_rpc.GenerateResponse(text=str(text or ""))
    response.finish_reason = FINISH.get(choice.get("finish_reason"), llm_pb2.FINISH_REASON_STOP)  # type: ignore[assignment]
    _copy_usage(event, response)
    # Until the usage settles it (or the tokenizer, without one): at most one
    # token per byte.
    response.token_count = response.usage.completion_tokens or len(response.text.encode())
    return response


def _chunk(event: Any) -> llm_rpc.GenerateResponse | None:
    """The llm chunk for one OpenAI stream event (None: nothing in it)."""
    if not isinstance(event, dict):
        raise ValueError("not a JSON object")
    if "error" in event:  # vLLM reports a failure inside the stream
        raise ValueError(str(event["error"])[:ECHO])
    response = llm_rpc.GenerateResponse()
    choices = event.get("choices") or ()
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if text:
            response.text = str(text)
            # One token per content event, as vLLM and hosted providers send
            # them; the usage at the end settles the real count.
            response.token_count = 1
        reason = choice.get("finish_reason")
        if reason:
            response.finish_reason = FINISH.get(reason, llm_pb2.FINISH_REASON_STOP)  # type: ignore[assignment]
    _copy_usage(event, response)
    if not response.text and not response.finish_reason and not response.HasField("usage"):
        return None
    return response


class OpenAIStub:
    """One OpenAI-compatible endpoint, called like an llm replica's stub."""

    def __init__(
        self,
        base_url: str,
        upstream_model: str,
        credential: Credential,
        session: aiohttp.ClientSession,
    ) -> None:
        self.base_url = base_url
        self.upstream_model = upstream_model
        self.credential = credential
        self.session = session

    def Generate(
        self,
        request: llm_rpc.GenerateRequest,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        whole: bool = False,
    ) -> UpstreamCall:
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        # Trace context and the request id go along (vLLM logs them).
        for name, value in metadata:
            if name in ("traceparent", "tracestate", "x-request-id"):
                headers[name] = value
        authorization = self.credential.header()
        if authorization is not None:
            headers["authorization"] = authorization
        return UpstreamCall(self, request, headers, timeout, whole)


def new_session(connections: int = 256) -> aiohttp.ClientSession:
    """The gateway's HTTP client: keep-alive connections, no cookies."""
    connector = aiohttp.TCPConnector(
        limit=connections, limit_per_host=connections, ttl_dns_cache=60
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        read_bufsize=MAX_LINE,
    )


async def close_session(session: aiohttp.ClientSession) -> None:
    with contextlib.suppress(Exception):
        await session.close()
    await asyncio.sleep(0)

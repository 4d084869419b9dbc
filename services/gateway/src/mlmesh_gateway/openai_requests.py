"""OpenAI request bodies, read into the gateway's own contract messages.

Each body becomes the message the gRPC API takes (``GenerateRequest``,
``EmbedRequest``) and is then checked against the contract's rules by the
same validator the gRPC surface runs (``mlmesh_chassis.validation``): one set
of rules, whichever door a request came in by. Violations name the OpenAI
parameter (``messages[2].content``, ``max_tokens``), not the proto path.

Parameters the mesh cannot honour are refused when set to anything but
their default (``n`` > 1, tools, logprobs, penalties...), rather than
silently ignored; purely informational ones (``user``, ``metadata``) are
accepted. Nothing here fetches a URL: images come as ``data:`` URLs only.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.llm.v1.llm_pb2 import ChatRole
from mlmesh_chassis.errors import FieldViolation, InvalidArgument
from mlmesh_chassis.validation import check_async
from mlmesh_sdk.reference import parse_reference

ROLES = {
    "system": ChatRole.CHAT_ROLE_SYSTEM,
    "developer": ChatRole.CHAT_ROLE_SYSTEM,
    "user": ChatRole.CHAT_ROLE_USER,
    "assistant": ChatRole.CHAT_ROLE_ASSISTANT,
}
MAX_MODEL_CHARS = 200
MAX_USER_CHARS = 128
DATA_URL = re.compile(r"data:(image/(?:png|jpeg|webp|gif));base64,([A-Za-z0-9+/=\s]+)", re.S)
# Parameters refused unless they hold their default (the mesh has no such feature).
UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
}
# Proto paths of the contract's rules -> OpenAI parameter names.
PATHS = (
    ("chat.messages", "messages"),
    ("sampling.max_tokens", "max_tokens"),
    ("sampling.", ""),
    ("texts", "input"),
    ("text", "prompt"),
    ("model.", "model"),
)


@dataclass
class Parsed:
    """A request read from its body: the contract message and the OpenAI options."""

    message: Any  # rpc.GenerateRequest or rpc.EmbedRequest
    model: str  # as the caller named it (echoed in the response)
    stream: bool = False
    include_usage: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    encoding_format: str = "float"


def _bad(param: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{param}: {problem}", [FieldViolation(param, problem)], param=param)


def _body(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad("body", "must be a JSON object")
    return value


def _number(body: dict[str, Any], name: str, kind: type = float) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, "must be a number")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise _bad(name, "must be an integer")
        value = int(value)
        if not -(2**63) <= value < 2**63:
            raise _bad(name, "is out of range")
    return value


def _unsupported(body: dict[str, Any]) -> None:
    for name, defaults in UNSUPPORTED_DEFAULTS.items():
        if name in body and body[name] not in defaults:
            raise _bad(name, "is not supported by this gateway; leave it unset")


def _model(body: dict[str, Any], upstreams: Any) -> ModelReference:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise _bad("model", "required: a model name (NAME, NAME/VERSION or NAME@ALIAS)")
    if len(name) > MAX_MODEL_CHARS:
        raise _bad("model", f"at most {MAX_MODEL_CHARS} characters")
    if name in upstreams:
        return ModelReference(model=name)
    try:
        return parse_reference(name)
    except ValueError as error:  # its message echoes the whole name: not sent back
        raise _bad(
            "model", "expected NAME, NAME/VERSION or NAME@ALIAS (lowercase letters, digits, '-')"
        ) from error


def _stream_options(body: dict[str, Any], parsed: Parsed) -> None:
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    parsed.stream = bool(stream)
    options = body.get("stream_options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    if not parsed.stream:
        raise _bad("stream_options", "only with stream: true")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise _bad("stream_options.include_usage", "must be true or false")
    parsed.include_usage = include


def _sampling(body: dict[str, Any], request: rpc.GenerateRequest) -> None:
    max_tokens = _number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    if max_tokens is not None:
        if not 1 <= max_tokens < 2**31:
            raise _bad("max_tokens", "must be at least 1")
        request.sampling.max_tokens = max_tokens
    for name in ("temperature", "top_p"):
        value = _number(body, name)
        if value is not None:
            setattr(request.sampling, name, value)
    top_k = _number(body, "top_k", int)
    if top_k is not None and top_k != -1:  # vLLM's -1: no limit
        if not 0 <= top_k < 2**31:
            raise _bad("top_k", "must be 0 or more")
        request.sampling.top_k = top_k
    seed = _number(body, "seed", int)
    if seed is not None:
        request.sampling.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop", "must be a string or a list of strings")
        request.sampling.stop.extend(stop[:9])  # the contract's rule reports more than 8


def _headers(body: dict[str, Any]) -> dict[str, str]:
    """What the gRPC surface reads from metadata: the A/B stickiness user."""
    user = body.get("user")
    headers = {}
    if isinstance(user, str) and user:
        headers["x-mlmesh-user-id"] = user[:MAX_USER_CHARS]
    return headers


def _content(value: Any, index: int, request: rpc.GenerateRequest) -> str:
    """A message's text (parts joined by newlines); its images go to ``request``."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if not isinstance(value, list):
        raise _bad(f"messages[{index}].content", "must be a string or a list of parts")
    texts = []
    for j, part in enumerate(value):
        where = f"messages[{index}].content[{j}]"
        if not isinstance(part, dict):
            raise _bad(where, "must be an object")
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            match = DATA_URL.fullmatch(url) if isinstance(url, str) else None
            if match is None:
                raise _bad(where, "images come as data:image/(png|jpeg|webp|gif);base64 URLs")
            try:
                data = base64.b64decode(match.group(2), validate=False)
            except (binascii.Error, ValueError) as error:
                raise _bad(where, "the image is not valid base64") from error
            request.images.add(data=data, media_type=match.group(1))
        else:
            raise _bad(where, "parts are {type: text, text} or {type: image_url, image_url}")
    return "\n".join(texts)


def _generation(body: dict[str, Any], upstreams: Any, region: str) -> rpc.GenerateRequest:
    """A GenerateRequest with the body's model and the caller's region."""
    _unsupported(body)
    request = rpc.GenerateRequest()
    request.model.CopyFrom(_model(body, upstreams))
    if region:
        request.region = region
    return request


def _parsed(body: dict[str, Any], request: rpc.GenerateRequest) -> Parsed:
    """The request with the body's sampling, and the OpenAI options."""
    _sampling(body, request)
    parsed = Parsed(request, body["model"], headers=_headers(body))
    _stream_options(body, parsed)
    return parsed


def chat_request(value: Any, upstreams: Any, region: str = "") -> Parsed:
    body = _body(value)
    request = _generation(body, upstreams, region)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "required: a non-empty list of messages")
    for i, message in enumerate(messages[:1001]):  # the contract reports more than 1000
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", "must be an object")
        role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise _bad(f"messages[{i}].role", "must be system, developer, user or assistant")
        content = _content(message.get("content"), i, request)
        request.chat.messages.add(role=role, content=content)
    return _parsed(body, request)


def completion_request(value: Any, upstreams: Any, region: str = "") -> Parsed:
    body = _body(value)
    request = _generation(body, upstreams, region)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad(
            "prompt", "required: one non-empty string (token arrays and batches are not taken)"
        )
    request.text = prompt
    return _parsed(body, request)


def embedding_request(value: Any) -> Parsed:
    body = _body(value)
    request = rpc.EmbedRequest()
    request.model.CopyFrom(_model(body, {}))
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _bad("input", "required: a string or a list of strings (token arrays are not taken)")
    request.texts.extend(texts[:257])  # the contract reports more than 256
    request.normalize = True
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _bad("encoding_format", "must be float or base64")
    if body.get("dimensions") is not None:
        raise _bad("dimensions", "is not supported: the model's own dimension is returned")
    return Parsed(request, body["model"], encoding_format=encoding)


def _openai_path(path: str) -> str:
    for proto, openai in PATHS:
        if path == proto.rstrip(".") or path.startswith(proto):
            return openai + path[len(proto) :] if openai else path[len(proto) :]
    return path


async def check_contract(parsed: Parsed) -> None:
    """The contract's rules, as the gRPC surface checks them; violations
    named by their OpenAI parameters."""
    try:
        await check_async(parsed.message)
    except InvalidArgument as error:
        violations = [
            FieldViolation(_openai_path(v.field), v.description) for v in error.violations
        ]
        first = violations[0].field if violations else "request"
        raise InvalidArgument(
            f"invalid {first}: {violations[0].description if violations else error.message}",
            violations,
            param=first,
        ) from error

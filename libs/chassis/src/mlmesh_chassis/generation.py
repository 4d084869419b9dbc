"""Generation defaults and caps the whole mesh shares (gateway, llm, SDK).

One place, so the gateway reserves exactly what the llm will generate: an
unset ``SamplingParams.max_tokens`` means ``DEFAULT_MAX_TOKENS`` everywhere
(mlmesh/llm/v1/llm.proto says so too).
"""

from __future__ import annotations

from typing import Any

from mlmesh_chassis.errors import FieldViolation, InvalidArgument

# Unset max_tokens means this many (llm.proto: "unset: 256").
DEFAULT_MAX_TOKENS = 256
# A prompt (text, or a chat's messages together) is refused above this many
# UTF-8 bytes before anything tokenizes it: tokenizing is CPU work on the
# llm (and a 4 MB prompt took seconds). 512 KiB is well over a 128k-token
# context at ~4 bytes per token.
MAX_PROMPT_BYTES = 512 * 1024


def max_tokens_of(sampling: Any) -> int:
    """A SamplingParams' max_tokens, or the mesh's default when unset."""
    return int(sampling.max_tokens) if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS


def prompt_bytes(request: Any) -> int:
    """The UTF-8 size of a GenerateRequest's / CountTokensRequest's prompt."""
    if request.WhichOneof("prompt") == "chat":
        return sum(len(m.content.encode()) for m in request.chat.messages)
    return len(request.text.encode())


def check_prompt_size(request: Any, prefix: str = "") -> None:
    """INVALID_ARGUMENT (BadRequest) for a prompt over MAX_PROMPT_BYTES."""
    size = prompt_bytes(request)
    if size > MAX_PROMPT_BYTES:
        kind = request.WhichOneof("prompt") or "text"
        path = f"{prefix}{kind}"
        raise InvalidArgument(
            f"the prompt has {size} bytes; at most {MAX_PROMPT_BYTES} are accepted",
            [FieldViolation(path, f"at most {MAX_PROMPT_BYTES} bytes (UTF-8)")],
            prompt_bytes=size,
            max_prompt_bytes=MAX_PROMPT_BYTES,
        )

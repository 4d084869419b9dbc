"""The one small interface every LLM engine implements.

The service speaks only this: a request of token ids and sampling settings in,
a stream of ``Delta``s out, ``abort`` by leaving the stream, and ``load()``
for the gateway's balancer. Engines: ``vllm`` (vLLM's AsyncLLM: its CPU
build here, its CUDA build on GPU nodes; the default), ``cpu`` (our own
continuous batching on torch CPU, kept as the fallback where vLLM's CPU build
does not run), ``null`` (zero-cost, for measuring the service itself).

A request that does not end normally raises one of the errors below instead
of finishing: the contract's finish reasons are all successful ends, so an
engine never reports an aborted or failed request as finished.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-sequence token
    STOP_SEQUENCE = "stop_sequence"  # one of the request's stop strings
    LENGTH = "length"  # max_tokens or the context length


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    stop: Sequence[str] = ()
    seed: int | None = None


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    media_type: str


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: Sequence[int]
    sampling: Sampling
    images: Sequence[ImageInput] = ()
    # Set by the service from the caller's deadline, if any (time.monotonic()).
    deadline: float | None = None


@dataclass
class Delta:
    """What the engine produced since the previous Delta for one request."""

    text: str
    token_count: int
    finish_reason: FinishReason | None = None
    # Filled on the final Delta.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_seconds: float = 0.0
    first_token_seconds: float = 0.0
    per_token_seconds: float = 0.0


@dataclass(frozen=True)
class Load:
    waiting: int
    running: int
    kv_cache_usage: float


@dataclass(frozen=True)
class ModelInfo:
    context_length: int
    chat: bool
    image_input: bool
    speculative: bool = False
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    # The text the prompt carries for each image (e.g. "<image>"): the engine
    # expands each into that image's tokens. Empty for text-only models.
    image_placeholder: str = ""


class EngineError(Exception):
    """A request the engine did not finish; the servicer maps each kind to a
    gRPC status."""


class QueueFull(EngineError):
    """The engine's queue is at its bound (RESOURCE_EXHAUSTED with RetryInfo)."""

    def __init__(self, waiting: int, retry_after_s: float, message: str = "") -> None:
        super().__init__(message or f"{waiting} requests are waiting")
        self.waiting = waiting
        self.retry_after_s = retry_after_s


class RequestRejected(EngineError):
    """The engine refused the request as given (INVALID_ARGUMENT): the caller
    must change it. ``field`` names the request field at fault, if known."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class RequestFailed(EngineError):
    """The engine failed this request but keeps serving others (UNAVAILABLE
    with RetryInfo): the same request may succeed when retried."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestAborted(EngineError):
    """The engine ended the stream itself (ABORTED), not at our caller's
    request: e.g. it was shut down or preempted the request for good."""


class EngineDead(EngineError):
    """The engine is gone for every request (UNAVAILABLE; the service stops
    reporting SERVING so the balancer sends traffic elsewhere)."""


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str: ...


class Engine(Protocol):
    """An engine serving one model version."""

    name: str
    info: ModelInfo

    @property
    def tokenizer(self) -> Tokenizer: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: EngineRequest) -> AsyncGenerator[Delta, None]:
        """Streams Deltas; closing the iterator early aborts the request and
        frees its slot. Raises QueueFull before the first Delta."""
        ...

    def load(self) -> Load: ...

"""The one small interface every LLM engine implements.

The service speaks only this: a request of token ids and sampling settings in,
a stream of ``Delta``s out, ``abort`` by leaving the stream, and ``load()``
for the gateway's balancer. Engines: ``cpu`` (continuous batching on torch
CPU), ``vllm`` (AsyncLLM on GPUs), ``null`` (zero-cost, for measuring the
service itself).
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


class QueueFull(Exception):
    """The engine's waiting queue is at its bound."""

    def __init__(self, waiting: int, retry_after_s: float) -> None:
        super().__init__(f"{waiting} requests are waiting")
        self.waiting = waiting
        self.retry_after_s = retry_after_s


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

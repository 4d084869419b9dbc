"""A zero-cost engine behind the same interface: it "generates" instantly.

It exists to measure the service itself (gRPC streaming, the interceptor,
the servicer), not a model: bench/llm_streaming.py uses it. Tokens are
whitespace-separated words; each Delta carries one token. With
``token_seconds`` it keeps a model's pace (each stream waits that long per
token, streams overlapping as in continuous batching): the gateway's routing
tests use it so that a replica's speed is visible without its CPU cost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence

from mlmesh_llm.engines.base import Delta, EngineRequest, FinishReason, Load, ModelInfo

_WORDS = ["lorem", "ipsum", "dolor", "sit", "amet"]


class WordTokenizer:
    eos_token_ids: frozenset[int] = frozenset()
    has_chat_template = True

    def encode(self, text: str) -> list[int]:
        return [hash(word) & 0xFFFF for word in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(_WORDS[i % len(_WORDS)] for i in ids)

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        return " ".join(f"{role}: {content}" for role, content in messages)


class NullEngine:
    name = "null"

    def __init__(self, context_length: int = 4096, token_seconds: float = 0.0) -> None:
        self.token_seconds = token_seconds
        self.tokenizer = WordTokenizer()
        self.info = ModelInfo(context_length=context_length, chat=True, image_input=False)
        self._running = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def load(self) -> Load:
        return Load(waiting=0, running=self._running, kv_cache_usage=0.0)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[Delta, None]:
        start = time.monotonic()
        self._running += 1
        try:
            total = request.sampling.max_tokens
            for i in range(total):
                last = i == total - 1
                delta = Delta(
                    text=_WORDS[i % len(_WORDS)] + " ",
                    token_count=1,
                    finish_reason=FinishReason.LENGTH if last else None,
                )
                if last:
                    delta.prompt_tokens = len(request.prompt_ids)
                    delta.completion_tokens = total
                    delta.first_token_seconds = 0.0
                    delta.per_token_seconds = (time.monotonic() - start) / max(total, 1)
                if self.token_seconds:
                    await asyncio.sleep(self.token_seconds)
                yield delta
                if i % 16 == 15:
                    await asyncio.sleep(0)  # let other streams run
        finally:
            self._running -= 1

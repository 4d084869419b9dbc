"""The llm's prompt handling: the size is capped before tokenizing, and
tokenizing runs off the event loop (a long prompt stalls no other stream)."""

from __future__ import annotations

import asyncio
import itertools
import time
from types import SimpleNamespace

import pytest
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.llm.v1 import llm_service_pb2 as rpc
from mlmesh_chassis.errors import InvalidArgument
from mlmesh_chassis.generation import DEFAULT_MAX_TOKENS, MAX_PROMPT_BYTES
from mlmesh_llm.config import LlmSettings
from mlmesh_llm.engines.base import Load
from mlmesh_llm.servicer import LlmServicer


class SlowTokenizer:
    """Blocks its thread for 0.4 s per prompt, like a tokenizer on a big one."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        time.sleep(0.4)
        return [1] * len(text.split())


def _servicer() -> tuple[LlmServicer, SlowTokenizer]:
    tokenizer = SlowTokenizer()
    engine = SimpleNamespace(
        tokenizer=tokenizer,
        info=SimpleNamespace(context_length=1024, chat=False),
        load=lambda: Load(waiting=0, running=0, kv_cache_usage=0.0),
    )
    loaded = SimpleNamespace(engine=engine)
    models = SimpleNamespace(lookup=lambda _reference: loaded)
    return LlmServicer(models, LlmSettings()), tokenizer  # type: ignore[arg-type]


class Context:
    def set_trailing_metadata(self, _metadata) -> None:
        pass


MODEL = model_reference_pb2.ModelReference(model="tiny-llama")


async def test_tokenizing_does_not_stall_the_event_loop():
    servicer, _ = _servicer()
    ticks: list[float] = []

    async def tick() -> None:
        for _ in range(30):
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    reply = await servicer.CountTokens(rpc.CountTokensRequest(model=MODEL, text="a b c"), Context())
    await ticker
    assert reply.token_count == 3
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < 0.2  # the loop kept running through the 0.4 s encode


async def test_a_prompt_over_the_cap_is_refused_before_tokenizing():
    servicer, tokenizer = _servicer()
    big = rpc.CountTokensRequest(model=MODEL, text="x" * (MAX_PROMPT_BYTES + 1))
    with pytest.raises(InvalidArgument) as raised:
        await servicer.CountTokens(big, Context())
    assert raised.value.violations[0].field == "text"
    assert tokenizer.calls == 0


def test_one_max_tokens_default_for_the_mesh():
    servicer, _ = _servicer()
    from mlmesh.llm.v1 import llm_pb2

    assert servicer._sampling(llm_pb2.SamplingParams()).max_tokens == DEFAULT_MAX_TOKENS

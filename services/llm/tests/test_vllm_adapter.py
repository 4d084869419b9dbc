"""The vLLM adapter against a stand-in of vLLM's documented v1 API.

vLLM cannot be installed on these CPU machines (see docs/architecture.md), so
these tests check the adapter's side of the contract: what it passes to
AsyncEngineArgs / AsyncLLM.generate / SamplingParams, how it turns DELTA
outputs into our Deltas, and that leaving a stream aborts the request. They
do not prove anything about vLLM itself.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
from mlmesh_llm.engines.base import EngineRequest, FinishReason, ImageInput, Sampling
from mlmesh_llm.engines.vllm import VllmEngine
from mlmesh_llm.tiny_model import build


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: Any = None


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0


@dataclass
class FakeAsyncLLM:
    args: Any
    calls: list[tuple[Any, Any, str]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    model_config: Any = None

    @classmethod
    def from_engine_args(cls, args):
        llm = cls(args)
        llm.model_config = types.SimpleNamespace(max_model_len=2048, is_multimodal_model=True)
        FakeAsyncLLM.last = llm
        return llm

    async def generate(self, prompt, params, request_id):
        self.calls.append((prompt, params, request_id))
        yield RequestOutput([CompletionOutput("Hel", [1, 2])], num_cached_tokens=0)
        yield RequestOutput([CompletionOutput("lo", [3])])
        yield RequestOutput(
            [CompletionOutput("!", [4], finish_reason="length")], finished=True, num_cached_tokens=2
        )

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def shutdown(self):
        pass


@pytest.fixture
def fake_vllm(monkeypatch):
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class AsyncEngineArgs:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Image:
        @staticmethod
        def open(stream):
            return ("image", stream.read())

    module("vllm", SamplingParams=SamplingParams)
    module("vllm.sampling_params", RequestOutputKind=types.SimpleNamespace(DELTA="delta"))
    module("vllm.engine")
    module("vllm.engine.arg_utils", AsyncEngineArgs=AsyncEngineArgs)
    module("vllm.v1")
    module("vllm.v1.engine")
    module("vllm.v1.engine.async_llm", AsyncLLM=FakeAsyncLLM)
    module("PIL", Image=Image)
    return FakeAsyncLLM


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build(
        tmp_path_factory.mktemp("tiny") / "m",
        vocab_size=300,
        hidden=32,
        layers=1,
        heads=2,
        kv_heads=1,
        context=128,
    )


async def test_engine_args_sampling_and_delta_outputs(fake_vllm, model_dir):
    options = {
        "tensor_parallel_size": 2,
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 4},
    }
    engine = VllmEngine(model_dir, options)
    await engine.start()
    llm = fake_vllm.last
    assert llm.args.kwargs["speculative_config"]["method"] == "ngram"
    assert llm.args.kwargs["model"] == str(model_dir)
    assert engine.info.context_length == 2048 and engine.info.speculative
    request = EngineRequest(
        "req-1",
        [5, 6, 7],
        Sampling(max_tokens=3, temperature=0.5, top_k=0, stop=("END",), seed=9),
        images=[ImageInput(b"png-bytes", "image/png")],
    )
    deltas = [d async for d in engine.generate(request)]
    prompt, params, request_id = llm.calls[0]
    assert request_id == "req-1"
    assert prompt["prompt_token_ids"] == [5, 6, 7]
    assert prompt["multi_modal_data"]["image"] == [("image", b"png-bytes")]
    assert params.kwargs["top_k"] == -1 and params.kwargs["seed"] == 9
    assert params.kwargs["output_kind"] == "delta" and params.kwargs["stop"] == ["END"]
    assert "".join(d.text for d in deltas) == "Hello!"
    assert [d.token_count for d in deltas] == [2, 1, 1]
    final = deltas[-1]
    assert final.finish_reason is FinishReason.LENGTH
    assert (final.prompt_tokens, final.completion_tokens, final.cached_tokens) == (3, 4, 2)
    assert llm.aborted == []  # finished normally


async def test_leaving_the_stream_aborts_the_request(fake_vllm, model_dir):
    engine = VllmEngine(model_dir, {})
    await engine.start()
    stream = engine.generate(EngineRequest("req-2", [1], Sampling(max_tokens=10)))
    await stream.__anext__()
    await stream.aclose()  # the caller went away
    assert fake_vllm.last.aborted == ["req-2"]

"""The CPU engine against the library's own generate, on a small built model."""

from __future__ import annotations

import asyncio

import pytest
import torch
from mlmesh_llm.engines.base import EngineRequest, FinishReason, QueueFull, Sampling
from mlmesh_llm.engines.cpu import CpuEngine, sample
from mlmesh_llm.engines.hf import load_causal_lm
from mlmesh_llm.tiny_model import build

PROMPTS = ["The model serves", "north south data", "A", "Gateway registry version alias " * 6]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build(
        tmp_path_factory.mktemp("tiny") / "m",
        vocab_size=512,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        context=256,
    )


async def run(engine, prompt, **sampling):
    ids = engine.tokenizer.encode(prompt)
    deltas = [d async for d in engine.generate(EngineRequest("r", ids, Sampling(**sampling)))]
    return deltas


async def test_batched_greedy_decoding_equals_sequential_generate(model_dir):
    engine = CpuEngine(model_dir, max_running=4)
    await engine.start()
    try:
        results = await asyncio.gather(
            *(run(engine, p, max_tokens=30, temperature=0.0) for p in PROMPTS)
        )
    finally:
        await engine.stop()
    model, tokenizer = load_causal_lm(model_dir)
    for prompt, deltas in zip(PROMPTS, results, strict=True):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        reference = model.generate(ids, max_new_tokens=30, do_sample=False)
        expected = tokenizer.decode(reference[0, ids.shape[1] :], skip_special_tokens=True)
        text = "".join(d.text for d in deltas)
        assert expected.rstrip("\ufffd").startswith(text) and len(text) >= len(expected) - 4
        assert deltas[-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
        assert deltas[-1].completion_tokens == sum(d.token_count for d in deltas)


async def test_more_requests_than_slots_queue_and_all_finish(model_dir):
    engine = CpuEngine(model_dir, max_running=2, max_waiting=3)
    await engine.start()
    try:
        results = await asyncio.gather(
            *(run(engine, p, max_tokens=10, seed=i) for i, p in enumerate(PROMPTS * 2)),
            return_exceptions=True,
        )
    finally:
        await engine.stop()
    finished = [r for r in results if not isinstance(r, BaseException)]
    rejected = [r for r in results if isinstance(r, QueueFull)]
    # all 8 arrive before the scheduler admits any: 3 wait, 5 are turned away
    assert len(finished) + len(rejected) == 8 and len(finished) >= 3 and rejected
    for deltas in finished:
        assert deltas[-1].finish_reason is not None


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([5.0, 4.0, 3.0, -10.0])
    generator = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, 1.0, 2, generator) for _ in range(200)} <= {0, 1}
    assert {sample(logits, 1.0, 0.5, 0, generator) for _ in range(200)} == {0}
    assert sample(logits, 0.0, 1.0, 0, generator) == 0

"""The vLLM adapter against the real engine: vLLM's CPU build, in the llm's
own environment (.envs/llm).

These tests import vLLM, so they run on that environment's Python: under the
services' Python (``make test``), test_vllm_in_its_env.py runs this file there
and conftest.py leaves it out of the outer session. Three engines start once
for the whole module, side by side: the tiny Llama, the same with ngram
speculative decoding, and a tiny vision-language model (Idefics3) for the
image path. Each takes about a minute to start on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from mlmesh_llm.engines.base import (
    Delta,
    EngineDead,
    EngineRequest,
    FinishReason,
    QueueFull,
    RequestAborted,
    RequestRejected,
    Sampling,
)
from mlmesh_llm.engines.vllm import VllmEngine, VllmLimits, engine_args
from mlmesh_llm.tiny_model import build, build_vlm

# vLLM and torch warn about their own internals at import and start.
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    # vLLM leaves a zmq context of a stopped engine to the garbage collector.
    pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in.*Context.__del__:pytest.PytestUnraisableExceptionWarning"
    ),
]
# Two batch slots and two waiting places (vLLM's queue bound: 4 requests), so
# that queueing, slot reuse and overflow take a handful of requests.
LIMITS = VllmLimits(max_running=2, max_waiting=2, kv_cache_mib=64)
# float32 as the model is saved, and the same on both engines, so greedy
# outputs compare token for token.
OPTIONS = {"dtype": "float32"}
SPECULATIVE = {
    **OPTIONS,
    "speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3},
}
# A prompt that repeats itself, so the ngram proposer has matches to propose.
REPEATING = "the mesh serves the model the mesh serves the model the mesh serves the"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("vllm") / "tiny-llama")


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vlm(tmp_path_factory.mktemp("vllm") / "tiny-vlm")


@pytest.fixture(scope="module")
async def all_engines(
    model_dir: Path, vlm_dir: Path
) -> AsyncIterator[tuple[VllmEngine, VllmEngine, VllmEngine]]:
    """The plain engine, the speculative one and the vision one, started side
    by side (the vision one without torch.compile: only its image path is
    under test, and compiling it would add to every run's start)."""
    started = (
        VllmEngine(model_dir, OPTIONS, LIMITS),
        VllmEngine(model_dir, SPECULATIVE, LIMITS),
        VllmEngine(vlm_dir, {"enforce_eager": True, "limit_mm_per_prompt": {"image": 2}}, LIMITS),
    )
    try:
        await asyncio.gather(*(engine.start() for engine in started))
        yield started
    finally:
        await asyncio.gather(*(engine.stop() for engine in started))
        gc.collect()  # vLLM's leftovers go now, under this module's warning filters


@pytest.fixture
def engines(
    all_engines: tuple[VllmEngine, VllmEngine, VllmEngine],
) -> tuple[VllmEngine, VllmEngine]:
    return all_engines[0], all_engines[1]


@pytest.fixture
def engine(engines: tuple[VllmEngine, VllmEngine]) -> VllmEngine:
    return engines[0]


def request(
    engine: VllmEngine, text: str = "The model serves", request_id: str = "r", **sampling: object
) -> EngineRequest:
    sampling.setdefault("max_tokens", 16)
    return EngineRequest(request_id, engine.tokenizer.encode(text), Sampling(**sampling))  # type: ignore[arg-type]


async def collect(engine: VllmEngine, req: EngineRequest) -> list[Delta]:
    return [delta async for delta in engine.generate(req)]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


async def wait_for(condition, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_engine_args_size_the_kv_cache_and_use_vllms_queue_bound(model_dir: Path) -> None:
    args = engine_args(model_dir, {}, LIMITS)
    assert args["kv_cache_memory_bytes"] == 64 * 1024 * 1024
    assert (args["max_num_seqs"], args["max_num_queued_reqs"]) == (2, 4)
    # a deployment that sizes the cache itself replaces ours
    assert "kv_cache_memory_bytes" not in engine_args(model_dir, {"gpu_memory_utilization": 0.9})


async def test_streams_deltas_with_usage_and_matches_transformers_greedy(
    engine: VllmEngine, model_dir: Path
) -> None:
    assert engine.info.context_length == 1024 and engine.info.chat
    assert not engine.info.image_input and not engine.info.speculative
    req = request(engine, max_tokens=24, temperature=0.0)
    deltas = await collect(engine, req)
    assert len(deltas) > 1 and all(d.token_count >= 1 for d in deltas)
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    final = deltas[-1]
    assert final.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert final.completion_tokens == sum(d.token_count for d in deltas) <= 24
    assert final.prompt_tokens == len(req.prompt_ids)
    assert final.first_token_seconds > 0 and final.queue_seconds >= 0
    # The same greedy tokens as the model's own forward pass in transformers.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = model.generate(
        torch.tensor([list(req.prompt_ids)]),
        max_new_tokens=final.completion_tokens,
        do_sample=False,
    )[0, len(req.prompt_ids) :]
    assert text_of(deltas) == engine.tokenizer.decode(reference.tolist())


async def test_stop_strings_end_the_stream_without_the_stop_text(engine: VllmEngine) -> None:
    full = text_of(await collect(engine, request(engine, max_tokens=40, temperature=0.0)))
    stop = full[6:9]
    assert len(stop) == 3
    deltas = await collect(engine, request(engine, max_tokens=40, temperature=0.0, stop=(stop,)))
    assert deltas[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert text_of(deltas) == full[: full.index(stop)]


async def test_same_seed_same_output(engine: VllmEngine) -> None:
    def sampled(seed: int) -> EngineRequest:
        return request(engine, max_tokens=24, temperature=1.0, seed=seed)

    first, second, other = [
        text_of(d) for d in await asyncio.gather(*(collect(engine, sampled(s)) for s in (7, 7, 8)))
    ]
    assert first == second
    assert first != other


async def test_leaving_a_stream_frees_its_slot_and_load_follows(engine: VllmEngine) -> None:
    assert engine.load().running == engine.load().waiting == 0
    # Both slots held by long greedy streams (the random-weight model does not
    # end them early), a third request waiting.
    long = [
        engine.generate(request(engine, f"long {i}", max_tokens=900, temperature=0.0))
        for i in range(2)
    ]
    await asyncio.gather(*(stream.__anext__() for stream in long))
    queued = engine.generate(request(engine, "queued", max_tokens=4))
    queued_first = asyncio.ensure_future(queued.__anext__())
    await wait_for(lambda: engine.load().waiting == 1)
    load = engine.load()
    assert load.running == 2 and load.kv_cache_usage > 0
    await asyncio.sleep(0.3)
    assert not queued_first.done(), "the third request should wait for a free slot"

    await long[0].aclose()  # the caller went away
    await asyncio.wait_for(queued_first, 10)
    # The queued request took the freed slot; the other long stream goes on.
    assert (await long[1].__anext__()).finish_reason is None
    rest = [delta async for delta in queued]
    assert (rest or [await queued_first])[-1].finish_reason is not None
    await long[1].aclose()
    await wait_for(lambda: engine.load().running == 0)
    assert engine.load() == type(engine.load())(waiting=0, running=0, kv_cache_usage=0.0)
    # and the engine serves the next request
    assert (await collect(engine, request(engine, max_tokens=3)))[-1].finish_reason is not None


async def test_equal_request_ids_are_separate_requests(engine: VllmEngine) -> None:
    """vLLM adds its own suffix to our ids: leaving one stream does not end
    another caller's stream that has the same id."""
    one = engine.generate(request(engine, "one", "same-id", max_tokens=200, temperature=0.0))
    two = engine.generate(request(engine, "two", "same-id", max_tokens=8, temperature=0.0))
    await one.__anext__()
    await two.__anext__()
    await one.aclose()
    rest = [delta async for delta in two]
    assert rest[-1].finish_reason is FinishReason.LENGTH


async def test_a_full_queue_is_queue_full_with_a_retry_delay(engine: VllmEngine) -> None:
    # vLLM's own bound: max_num_queued_reqs = 2 slots + 2 waiting.
    streams = [
        engine.generate(request(engine, f"burst {i}", max_tokens=300, temperature=0.0))
        for i in range(6)
    ]
    results = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
    try:
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(refused) == 2, results
        for error in refused:
            assert isinstance(error, QueueFull)
            assert 0 < error.retry_after_s <= 30 and error.waiting >= 2
    finally:
        for stream in streams:
            await stream.aclose()
    await wait_for(lambda: engine.load().running == 0)


async def test_an_engine_side_abort_is_not_a_successful_end(engine: VllmEngine) -> None:
    stream = engine.generate(request(engine, "aborted", "to-abort", max_tokens=500))
    await stream.__anext__()
    await engine._llm.abort("to-abort")  # e.g. an operator's or the engine's own abort
    with pytest.raises(RequestAborted):
        async for _ in stream:
            pass


async def test_a_request_vllm_refuses_is_rejected(engine: VllmEngine) -> None:
    bad = EngineRequest("bad", [10**7], Sampling(max_tokens=4))  # no such token
    with pytest.raises(RequestRejected, match="out of vocabulary"):
        await collect(engine, bad)
    assert (await collect(engine, request(engine, max_tokens=2)))[-1].finish_reason is not None


async def test_ngram_speculative_decoding_gives_the_same_greedy_output(
    engines: tuple[VllmEngine, VllmEngine],
) -> None:
    plain, speculative = engines
    assert speculative.info.speculative
    for text in (REPEATING, "The model serves"):
        want = await collect(plain, request(plain, text, max_tokens=48, temperature=0.0))
        got = await collect(speculative, request(speculative, text, max_tokens=48, temperature=0.0))
        assert text_of(got) == text_of(want)
        assert got[-1].completion_tokens == want[-1].completion_tokens
        if text == REPEATING:
            # several tokens in one delta: the proposer's tokens were accepted
            assert any(d.token_count > 1 for d in got)


async def test_a_dead_engine_is_engine_dead(engines: tuple[VllmEngine, VllmEngine]) -> None:
    """Kills the speculative engine's core process (and its worker): no test
    after this one uses that engine."""
    _, speculative = engines
    manager = speculative._llm.engine_core.resources.engine_manager
    (core,) = [psutil.Process(p.pid) for p in manager.processes]
    for process in [*core.children(recursive=True), core]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    await wait_for(lambda: speculative.errored, 30)
    with pytest.raises(EngineDead):
        await collect(speculative, request(speculative, max_tokens=4))


# ---- images, through the servicer's Generate -------------------------------------


class _Models:
    """The one loaded version the servicer looks up (no registry here)."""

    def __init__(self, engine: VllmEngine) -> None:
        import datetime as dt

        from mlmesh_llm.models import LoadedVersion

        self.loaded = LoadedVersion("tiny-vlm", 1, engine, dt.datetime.now(dt.UTC))

    def lookup(self, reference: object) -> object:
        return self.loaded

    @contextlib.contextmanager
    def lease(self, loaded: object):  # type: ignore[no-untyped-def]
        yield loaded


class _Context:
    def time_remaining(self) -> None:
        return None

    def set_trailing_metadata(self, metadata: object) -> None:
        self.trailing = metadata


def png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


async def generate(servicer: object, request: object) -> list:  # type: ignore[type-arg]
    return [r async for r in servicer.Generate(request, _Context())]  # type: ignore[attr-defined]


async def test_images_go_through_generate_and_their_tokens_are_counted(
    all_engines: tuple[VllmEngine, VllmEngine, VllmEngine], vlm_dir: Path
) -> None:
    import json

    from mlmesh.common.v1 import model_reference_pb2
    from mlmesh.llm.v1 import llm_pb2
    from mlmesh.llm.v1 import llm_service_pb2 as rpc
    from mlmesh_chassis.errors import InvalidArgument
    from mlmesh_llm.config import LlmSettings
    from mlmesh_llm.servicer import LlmServicer

    vlm = all_engines[2]
    assert vlm.info.image_input and vlm.info.image_placeholder == "<image>"
    servicer = LlmServicer(_Models(vlm), LlmSettings())  # type: ignore[arg-type]
    model = model_reference_pb2.ModelReference(model="tiny-vlm", version=1)
    image = llm_pb2.Image(data=png(40, 30, (200, 10, 10)), media_type="image/png")
    sampling = llm_pb2.SamplingParams(max_tokens=6, temperature=0.0)
    text = "What is in the picture?"
    # Each image's one placeholder becomes its tokens between Idefics3's
    # wrapper tokens: <fake_token_around_image><global-img><image>x4<fake...>.
    per_image = json.loads((vlm_dir / "mlmesh-build.json").read_text())["image_tokens"] + 3
    plain = len(vlm.tokenizer.encode(text))
    for images in ([image], [image, image]):
        responses = await generate(
            servicer, rpc.GenerateRequest(model=model, text=text, images=images, sampling=sampling)
        )
        final = responses[-1]
        assert final.finish_reason != llm_pb2.FINISH_REASON_UNSPECIFIED
        # the text, one "\n" after each placeholder, and each image's tokens
        newline = len(vlm.tokenizer.encode("\n"))
        assert final.usage.prompt_tokens == plain + len(images) * (per_image + newline)
        assert final.usage.completion_tokens == sum(r.token_count for r in responses) > 0
    # In a chat, the placeholders go into the last user turn.
    chat = llm_pb2.Chat(
        messages=[
            llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_SYSTEM, content="Be brief."),
            llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content=text),
        ]
    )
    responses = await generate(
        servicer, rpc.GenerateRequest(model=model, chat=chat, images=[image], sampling=sampling)
    )
    assert responses[-1].usage.prompt_tokens > plain + per_image
    # An unreadable image is the caller's fault, named by its index.
    broken = llm_pb2.Image(data=b"\x89PNG not really", media_type="image/png")
    with pytest.raises(InvalidArgument) as refused:
        await generate(
            servicer,
            rpc.GenerateRequest(model=model, text=text, images=[broken], sampling=sampling),
        )
    assert refused.value.violations[0].field == "images[0]"

"""The fake OpenAI-compatible upstream (mlmesh_gateway.fake_upstream), checked
with the official ``openai`` client: if the client reads it as OpenAI, the
gateway's tests and the benchmark can trust it as a stand-in upstream."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from mlmesh_gateway.fake_upstream import FakeUpstream, start_fake
from openai.types.chat import ChatCompletionMessageParam

KEY = "sk-fake-test"
MODEL = "fake-64"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "say hello to the fake"},
]
PROMPT_WORDS = 7  # whitespace words in MESSAGES' contents


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    server = await start_fake(tokens=64, api_key=KEY, models=(MODEL, "other"))
    yield server
    await server.close()


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake.url, api_key=KEY, max_retries=0) as c:
        yield c


async def test_chat_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finishes, usage, roles = [], [], None, []
    async for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        roles.append(choice.delta.role)
        text.append(choice.delta.content or "")
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    assert roles[0] == "assistant"
    assert "".join(text) == "tok " * 64
    assert sum(1 for t in text if t) == 64  # one token per chunk
    assert finishes == ["stop"]
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        PROMPT_WORDS,
        64,
        PROMPT_WORDS + 64,
    )


async def test_stream_max_tokens_without_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        max_tokens=5,
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok " * 5
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_non_streaming_chat_and_completions(client: openai.AsyncOpenAI) -> None:
    chat = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=3,
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.content == "tok tok tok "
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (PROMPT_WORDS, 3)

    text = await client.completions.create(model=MODEL, prompt="one two three", max_tokens=100)
    assert text.choices[0].text == "tok " * 64
    assert text.choices[0].finish_reason == "stop"
    assert text.usage is not None
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (3, 64)

    stream = await client.completions.create(
        model=MODEL,
        prompt=[1, 2, 3, 4],
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in parts if c.choices) == "tok tok "
    assert parts[-1].usage is not None
    assert (parts[-1].usage.prompt_tokens, parts[-1].usage.completion_tokens) == (4, 2)


async def test_models_and_embeddings(client: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in client.models.list()]
    assert models == [MODEL, "other"]
    # The client asks for base64 by default and decodes it.
    reply = await client.embeddings.create(model=MODEL, input=["a b", "c"])
    assert [len(d.embedding) for d in reply.data] == [8, 8]
    assert reply.usage.prompt_tokens == 3
    again = await client.embeddings.create(model=MODEL, input="a b", encoding_format="float")
    assert again.data[0].embedding == pytest.approx(reply.data[0].embedding)


async def test_errors_in_openai_shape(fake: FakeUpstream) -> None:
    async with openai.AsyncOpenAI(base_url=fake.url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as denied:
            await bad.models.list()
    assert denied.value.status_code == 401
    assert denied.value.code == "invalid_api_key"
    async with openai.AsyncOpenAI(base_url=fake.url, api_key=KEY, max_retries=0) as good:
        with pytest.raises(openai.NotFoundError) as missing:
            await good.chat.completions.create(model="nope", messages=MESSAGES)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError):
            await good.chat.completions.create(model=MODEL, messages=[])
        with pytest.raises(openai.BadRequestError):
            await good.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)


async def test_429_fault_then_recovery(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    async with httpx.AsyncClient() as admin:
        reply = await admin.post(
            fake.url.removesuffix("/v1") + "/_faults",
            json={"status": 429, "retry_after": 2, "times": 1},
        )
        assert reply.status_code == 200
        bad = await admin.post(fake.url.removesuffix("/v1") + "/_faults", json={"status": "x"})
        assert bad.status_code == 400
    fake.set_faults(status=429, retry_after=2, times=1)
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert limited.value.status_code == 429
    assert limited.value.response.headers["retry-after"] == "2"
    assert limited.value.code == "rate_limit_exceeded"
    ok = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert ok.choices[0].message.content == "tok "


async def test_kill_mid_stream_raises(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.set_faults(kill_after_chunks=3)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
    )
    got = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        async for chunk in stream:
            got.append(chunk)
    assert len(got) == 3
    with pytest.raises((httpx.HTTPError, openai.APIConnectionError)):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)


async def test_latency_delay_and_omit_usage(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.set_faults(latency_ms=200, chunk_delay_ms=20, omit_usage=True, times=1)
    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        max_tokens=5,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert time.perf_counter() - started >= 0.2 + 5 * 0.02
    assert all(chunk.usage is None for chunk in chunks)
    plain = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert plain.usage is not None  # times=1: the plan is spent


async def test_request_log(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    async with httpx.AsyncClient() as admin:
        seen = (await admin.get(fake.url.removesuffix("/v1") + "/_requests")).json()
    last = seen["requests"][-1]
    assert last["path"] == "/v1/chat/completions"
    assert (last["model"], last["stream"], last["max_tokens"]) == (MODEL, False, 2)
    assert last["authorization_sha256"] == hashlib.sha256(f"Bearer {KEY}".encode()).hexdigest()
    assert seen["counts"]["/v1/chat/completions"] == 1


async def test_runs_as_a_process(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mlmesh_gateway.fake_upstream",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--tokens",
        "4",
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if port_file.exists() or process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="any", max_retries=0) as c:
            reply = await c.completions.create(model=MODEL, prompt="x")
        assert reply.choices[0].text == "tok " * 4
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_caller_going_away_is_counted(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.set_faults(chunk_delay_ms=20)
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    async for _chunk in stream:
        break
    await stream.close()
    for _ in range(100):
        if fake.disconnects:
            break
        await asyncio.sleep(0.02)
    assert fake.disconnects == 1
    fake.reset()
    again = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert again.choices[0].message.content == "tok "

"""The OpenAI-compatible surface through Envoy's front door, on the real mesh:
the official ``openai`` client against the llm service (tiny-llama on vLLM's
CPU build), against a real ``vllm serve`` upstream (``tiny-llama-vllm``,
the ``vllmopenai`` process), and against Triton (minilm embeddings). Each is
keyed, throttled and billed like the gRPC API."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from meshkit import usage_buckets
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, key_service_pb2_grpc, usage_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh.llm.v1 import llm_pb2, llm_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_sdk.channel import mesh_channel

LLM = "tiny-llama@champion"
VLLM = "tiny-llama-vllm"
pytestmark = pytest.mark.timeout(400)
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a colour of the sky, please."},
]


@pytest.fixture
async def keys(full_mesh):
    """(make a key -> (id, secret), the admin's UsageService stub)."""
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        stub = key_service_pb2_grpc.KeyServiceStub(channel)

        async def make(**limits: int) -> tuple[str, str]:
            key = pb.Key(
                display_name="openai",
                scopes=pb.KeyScopes(
                    services=[pb.PLATFORM_SERVICE_GENERATE, pb.PLATFORM_SERVICE_EMBED]
                ),
                limits=pb.KeyLimits(**limits),
            )
            reply = await stub.CreateKey(keys_rpc.CreateKeyRequest(key=key))
            return reply.key.id, reply.secret

        yield make, usage_service_pb2_grpc.UsageServiceStub(channel)


def _client(full_mesh, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://{full_mesh.address}/v1", api_key=secret, max_retries=0, timeout=120
    )


def _count_tokens_calls(full_mesh) -> int:
    """CountTokens calls the llm has served (its Prometheus endpoint)."""
    port = full_mesh.services["llm"]["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    method = "/mlmesh.llm.v1.LlmService/CountTokens"
    pattern = r'mlmesh_rpc_requests_total\{[^}]*method="' + method + r'"[^}]*\} (\S+)'
    return int(sum(float(v) for v in re.findall(pattern, text)))


async def _llm_count(full_mesh, model: str, messages) -> int:
    """The llm's own count of a chat's prompt (its CountTokens)."""
    roles = {"system": llm_pb2.CHAT_ROLE_SYSTEM, "user": llm_pb2.CHAT_ROLE_USER}
    request = llm_rpc.CountTokensRequest(model=model_reference_pb2.ModelReference(model=model))
    for message in messages:
        request.chat.messages.add(role=roles[message["role"]], content=message["content"])
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        reply = await llm_service_pb2_grpc.LlmServiceStub(channel).CountTokens(request)
    return int(reply.token_count)


async def test_chat_through_envoy_on_the_llm_is_counted_here_and_billed(full_mesh, keys):
    make, usage = keys
    key_id, secret = await make(tokens_per_minute=1_000_000)
    client = _client(full_mesh, secret)
    # The gateway counts prompts with the model's tokenizer, fetched once per
    # version: once it holds it, a completion costs the llm no CountTokens.
    for _ in range(40):
        before = await asyncio.to_thread(_count_tokens_calls, full_mesh)
        reply = await client.chat.completions.create(
            model=LLM, messages=MESSAGES, max_tokens=4, temperature=0
        )
        if await asyncio.to_thread(_count_tokens_calls, full_mesh) == before:
            break
        await asyncio.sleep(0.5)
    else:
        pytest.fail("the gateway still asks the llm to count prompt tokens")
    assert reply.choices[0].message.content
    assert reply.usage.prompt_tokens == await _llm_count(full_mesh, "tiny-llama", MESSAGES)
    stream = await client.chat.completions.create(
        model=LLM,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, final = [], None
    async for chunk in stream:
        pieces.extend(c.delta.content or "" for c in chunk.choices)
        final = chunk.usage or final
    assert final is not None and final.completion_tokens == 6 and "".join(pieces)
    buckets = [b for b in await usage_buckets(usage, key_id) if b.model == "tiny-llama"]
    assert sum(b.request_count for b in buckets) >= 2
    assert sum(b.usage.completion_tokens for b in buckets) >= 4 + 6
    await client.close()


async def test_a_real_vllm_serve_upstream_is_routed_limited_and_billed(full_mesh, keys):
    make, usage = keys
    key_id, secret = await make(tokens_per_minute=400)
    client = _client(full_mesh, secret)
    reply = await client.chat.completions.create(
        model=VLLM, messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content
    # vLLM renders the same chat template with the same tokenizer: its usage
    # is the count the llm (and the gateway) make.
    assert reply.usage.prompt_tokens == await _llm_count(full_mesh, "tiny-llama", MESSAGES)
    assert reply.usage.completion_tokens == 8
    stream = await client.completions.create(
        model=VLLM,
        prompt="The sky is",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, final = [], None
    async for chunk in stream:
        text.extend(c.text for c in chunk.choices)
        final = chunk.usage or final
    assert final is not None and final.completion_tokens == 5
    # The same model through the gRPC API: one code path.
    async with mesh_channel(full_mesh.address, secret) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        request = rpc.GenerateRequest(
            model=model_reference_pb2.ModelReference(model=VLLM),
            text="The sky is",
            sampling=pb.SamplingParams(max_tokens=3, temperature=0),
        )
        chunks = [c async for c in gateway.Generate(request)]
        # (The tiny model's random tokens may decode to nothing: the count
        # is the upstream's usage at the end.)
        assert chunks[-1].usage.completion_tokens == 3
    buckets = [b for b in await usage_buckets(usage, key_id) if b.model == VLLM]
    assert sum(b.request_count for b in buckets) == 3
    assert sum(b.usage.completion_tokens for b in buckets) == 8 + 5 + 3
    # 400 tokens a minute: a request reserving more than is left is refused
    # with the throttle's wait, and nothing reaches vLLM.
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(10):
            await client.chat.completions.create(model=VLLM, messages=MESSAGES, max_tokens=200)
    assert 0 < int(refused.value.response.headers["retry-after-ms"]) <= 60_000
    await client.close()


async def test_models_embeddings_and_errors_through_envoy(full_mesh, keys):
    make, _ = keys
    _, secret = await make()
    client = _client(full_mesh, secret)
    listed = {m.id: m.model_extra["mlmesh"] for m in (await client.models.list()).data}
    assert listed["tiny-llama"]["backend"] == "llm_service"
    assert listed[VLLM]["backend"] == "openai_compatible"
    assert listed["minilm"]["capabilities"] == ["embedding", "infer"]
    assert "digits" not in listed  # the key has no INFER scope
    embedded = await client.embeddings.create(
        model="minilm", input=["a mesh of services", "one key for every model"]
    )
    vectors = np.array([e.embedding for e in embedded.data])
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert embedded.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=LLM, messages=MESSAGES, temperature=3)
    assert bad.value.body["param"] == "temperature"
    stranger = _client(full_mesh, "mlm_0000000000000000_" + "x" * 32)
    with pytest.raises(openai.AuthenticationError):
        await stranger.models.list()
    await stranger.close()
    # No key at all (LiteLLM answers this with a 500).
    status, body = await asyncio.to_thread(
        _get_without_key, f"http://{full_mesh.address}/v1/models"
    )
    assert status == 401 and body["error"]["code"] == "api_key_missing"
    await client.close()


def _get_without_key(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())

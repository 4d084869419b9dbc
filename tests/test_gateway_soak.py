"""Three gateway replicas sharing Redis: 32 clients for 60 s against one
tokens-per-minute limit, through Envoy, with the zero-cost LLM engine."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time

import grpc
import pytest
import redis
from meshkit import MeshInfo, start_mesh, stop_mesh
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, key_service_pb2_grpc, usage_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh.gateway.v1 import usage_service_pb2 as usage_rpc
from mlmesh.llm.v1 import llm_pb2
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_sdk.channel import mesh_channel

LIMIT = 20_000
DURATION_S = 60.0
CLIENTS = 32
REDIS_URL = os.environ.get("MLMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def soak_mesh(tmp_path_factory, postgres_url):
    redis.Redis.from_url(REDIS_URL).flushdb()
    state = tmp_path_factory.mktemp("mesh-soak")
    env = {
        "MLMESH_LLM_ENGINE": "null",
        "MLMESH_GATEWAY_REDIS_URL": REDIS_URL,
        "MLMESH_GATEWAY_REPLICAS": "3",
        "MLMESH_GATEWAY_DATABASE_URL": postgres_url,
    }
    process, ready = start_mesh(
        state, env, services="registry,llm,gateway", extra_args=("--replicas", "gateway=3")
    )
    try:
        yield MeshInfo(
            "soak", ready["address"], ready["admin"], state, ready["services"], ready["api_key"]
        )
    finally:
        stop_mesh(process)


async def test_replicas_never_admit_more_than_the_limit(soak_mesh):
    assert {"gateway", "gateway.1", "gateway.2"} <= set(soak_mesh.services)
    async with mesh_channel(soak_mesh.address, soak_mesh.api_key) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        created = await keys.CreateKey(
            keys_rpc.CreateKeyRequest(
                key=pb.Key(display_name="soak", limits=pb.KeyLimits(tokens_per_minute=LIMIT))
            )
        )
    admitted = streamed = rejected = 0
    started = time.monotonic()

    async def client(i: int) -> None:
        nonlocal admitted, streamed, rejected
        async with mesh_channel(soak_mesh.address, created.secret) as channel:
            gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
            while time.monotonic() - started < DURATION_S - 1:
                request = rpc.GenerateRequest(
                    region="local",
                    request=llm_rpc.GenerateRequest(
                        model=model_reference_pb2.ModelReference(
                            model="tiny-llama", alias="champion"
                        ),
                        text=f"soak client {i}",
                        sampling=llm_pb2.SamplingParams(max_tokens=100),
                    ),
                )
                try:
                    chunks = [c async for c in gateway.Generate(request, timeout=30)]
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                    rejected += 1
                    await asyncio.sleep(0.5)  # a client backing off
                    continue
                usage = chunks[-1].response.usage
                admitted += usage.prompt_tokens + usage.completion_tokens
                streamed += sum(c.response.token_count for c in chunks)

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    print(
        f"\nsoak: {CLIENTS} clients, {DURATION_S:.0f} s, 3 gateway replicas + Redis: "
        f"admitted {admitted} of {LIMIT} tokens ({admitted / LIMIT:.2%}), "
        f"{rejected} rejections, {streamed} tokens streamed"
    )
    assert rejected > 0, "demand never exceeded the limit"
    assert admitted <= LIMIT, f"admitted {admitted} tokens over a limit of {LIMIT}"
    assert admitted >= 0.97 * LIMIT, f"only {admitted / LIMIT:.1%} of the limit was used"
    await asyncio.sleep(0.5)  # every replica writes its usage events within 100 ms
    async with mesh_channel(soak_mesh.address, soak_mesh.api_key) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        now = dt.datetime.now(dt.UTC)
        request = usage_rpc.GetUsageRequest(key_ids=[created.key.id])
        request.start_time.FromDatetime(now - dt.timedelta(hours=1))
        request.end_time.FromDatetime(now + dt.timedelta(minutes=1))
        buckets = (await usage.GetUsage(request)).buckets
    ledger_completion = sum(b.usage.completion_tokens for b in buckets)
    ledger_total = sum(b.usage.prompt_tokens + b.usage.completion_tokens for b in buckets)
    assert ledger_completion == streamed  # every streamed token billed, once
    assert ledger_total == admitted

"""Three gateway replicas sharing Redis, through Envoy, with the zero-cost LLM
engine: 32 clients for 60 s against one tokens-per-minute limit; then Redis
stopped mid-run (the outage policy: each replica enforces limits / 3)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from meshkit import MeshInfo, generate_request, start_mesh, stop_mesh, usage_buckets
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, key_service_pb2_grpc, usage_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh_chassis.testing import RedisServer
from mlmesh_sdk.channel import mesh_channel

LIMIT = 20_000
DURATION_S = 60.0
CLIENTS = 32
pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A Redis of this module's own, on a TCP port, that a test can stop."""
    server = RedisServer(tmp_path_factory.mktemp("soak-redis"), tcp=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def soak_mesh(tmp_path_factory, postgres_url, redis_server):
    state = tmp_path_factory.mktemp("mesh-soak")
    env = {
        "MLMESH_LLM_ENGINE": "null",
        "MLMESH_GATEWAY_REDIS_URL": redis_server.url,
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


async def create_key(
    mesh: MeshInfo, name: str, tokens_per_minute: int
) -> keys_rpc.CreateKeyResponse:
    async with mesh_channel(mesh.address, mesh.api_key) as channel:
        return await key_service_pb2_grpc.KeyServiceStub(channel).CreateKey(
            keys_rpc.CreateKeyRequest(
                key=pb.Key(
                    display_name=name, limits=pb.KeyLimits(tokens_per_minute=tokens_per_minute)
                )
            )
        )


def generate(text: str, max_tokens: int = 100) -> rpc.GenerateRequest:
    return generate_request(text, max_tokens=max_tokens)


async def test_replicas_never_admit_more_than_the_limit(soak_mesh):
    assert {"gateway", "gateway.1", "gateway.2"} <= set(soak_mesh.services)
    created = await create_key(soak_mesh, "soak", LIMIT)
    admitted = streamed = rejected = 0
    started = time.monotonic()

    async def client(i: int) -> None:
        nonlocal admitted, streamed, rejected
        async with mesh_channel(soak_mesh.address, created.secret) as channel:
            gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
            while time.monotonic() - started < DURATION_S - 1:
                try:
                    chunks = [
                        c async for c in gateway.Generate(generate(f"soak client {i}"), timeout=30)
                    ]
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
        buckets = await usage_buckets(usage, created.key.id)
    ledger_completion = sum(b.usage.completion_tokens for b in buckets)
    ledger_total = sum(b.usage.prompt_tokens + b.usage.completion_tokens for b in buckets)
    assert ledger_completion == streamed  # every streamed token billed, once
    assert ledger_total == admitted


async def test_redis_stopped_mid_run_the_outage_policy_holds(soak_mesh, redis_server):
    """Redis down: each replica admits at most limit / 3 in its own window,
    which starts from what it admitted through Redis, so the three together
    stay within the limit across the switch (Envoy spreads calls evenly);
    nothing fails open or hangs; the replicas go back to Redis when it
    returns."""
    limit = 30_000
    created = await create_key(soak_mesh, "redis-outage", limit)
    phases = {"before": [0, 0], "outage": [0, 0], "after": [0, 0]}  # admitted, rejected
    phase = "before"
    slowest = 0.0
    errors: list[grpc.RpcError] = []

    async def client(i: int) -> None:
        nonlocal slowest
        async with mesh_channel(soak_mesh.address, created.secret) as channel:
            gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
            while phase != "done":
                counted_in, started = phase, time.monotonic()
                try:
                    chunks = [c async for c in gateway.Generate(generate(f"outage {i}"), timeout=5)]
                    usage = chunks[-1].response.usage
                    phases[counted_in][0] += usage.prompt_tokens + usage.completion_tokens
                    if counted_in == "before":
                        await asyncio.sleep(0.2)  # about half the budget before the outage
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        errors.append(error)
                    phases[counted_in][1] += 1
                    await asyncio.sleep(0.2)
                slowest = max(slowest, time.monotonic() - started)

    clients = [asyncio.ensure_future(client(i)) for i in range(16)]
    await asyncio.sleep(2.0)
    redis_server.stop()
    phase = "outage"
    # At least 6 s of outage, and (on a slow machine) until the replicas'
    # outage budgets run out: at most 20 s.
    await asyncio.sleep(6.0)
    for _ in range(56):  # 14 s more at most
        if phases["outage"][1] > 0:
            break
        await asyncio.sleep(0.25)
    phase = "after"
    redis_server.start()  # empty: a restarted Redis has no windows
    await asyncio.sleep(4.0)
    phase = "done"
    await asyncio.gather(*clients)
    print(
        f"\nRedis outage, 3 replicas, limit {limit} tokens/min: {phases}, slowest {slowest:.2f} s"
    )
    assert not errors, [f"{e.code().name}: {e.details()}" for e in errors]
    assert slowest < 5.0  # no request hung
    admitted_in_outage, rejected_in_outage = phases["outage"]
    # Neither fail-open nor fail-closed: each replica admits up to limit / 3,
    # counting what it admitted through Redis in the minute before.
    assert admitted_in_outage > 0, phases
    assert rejected_in_outage > 0, phases
    assert phases["before"][0] + admitted_in_outage <= 1.1 * limit, phases
    # Back on Redis: the replicas decide there again.
    keys = await asyncio.to_thread(redis_keys, redis_server.url)
    assert any(created.key.id in key for key in keys), keys
    assert phases["after"][0] > 0


def redis_keys(url: str) -> list[str]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return [key.decode() for key in client.keys("mlmesh:throttle:*")]
    finally:
        client.close()

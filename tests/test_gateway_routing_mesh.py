"""The gateway's routing against real llm replicas, through Envoy.

Three llm processes (the zero-cost engine at a model's pace: 2 ms per token),
two in region "west" and one in "east", behind one gateway in "west". The
faults are real: a replica is slowed down tenfold by stopping and continuing
its process (SIGSTOP for 90% of every 50 ms), killed with SIGKILL mid-stream,
or stopped and then killed before it sent a first token. The runner restarts
killed replicas on the same port, as it would in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from meshkit import MeshInfo, generate_request, start_mesh, stop_mesh, usage_buckets
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, key_service_pb2_grpc, usage_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh_sdk.channel import mesh_channel

pytestmark = pytest.mark.timeout(400)
TOKEN_SECONDS = 0.002
SATURATION = 4  # in flight per endpoint before its region counts as saturated
REGIONS = {"llm": "west", "llm.1": "west", "llm.2": "east", "gateway": "west"}


@pytest.fixture(scope="module")
def routing_mesh(tmp_path_factory) -> Iterator[MeshInfo]:
    state = tmp_path_factory.mktemp("mesh-routing")
    env = {
        "MLMESH_LLM_ENGINE": "null",
        "MLMESH_LLM_NULL_TOKEN_SECONDS": str(TOKEN_SECONDS),
        "MLMESH_GATEWAY_SATURATION": str(SATURATION),
    }
    args: tuple[str, ...] = ("--replicas", "llm=3")
    for instance, region in REGIONS.items():
        args += ("--region", f"{instance}={region}")
    process, ready = start_mesh(state, env, services="registry,llm,gateway", extra_args=args)
    try:
        yield MeshInfo(
            "routing", ready["address"], ready["admin"], state, ready["services"], ready["api_key"]
        )
    finally:
        stop_mesh(process)


def services(mesh: MeshInfo) -> dict[str, dict]:
    """The runner's current view (pids change when it restarts a replica)."""
    return json.loads((mesh.state_dir / "ready.json").read_text())["services"]


def instance_at(mesh: MeshInfo, address: str) -> str:
    port = int(address.rsplit(":", 1)[1])
    return next(name for name, s in services(mesh).items() if s["port"] == port)


async def wait_restarted(mesh: MeshInfo, instance: str, old_pid: int) -> None:
    """Until the runner has brought ``instance`` back (a new pid, SERVING)."""
    deadline = time.monotonic() + 60
    while services(mesh)[instance]["pid"] == old_pid:
        assert time.monotonic() < deadline, f"{instance} was not restarted"
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def slowed_down(pid: int, factor: int = 10, period_s: float = 0.05) -> Iterator[None]:
    """Runs the process 1/factor of the time: SIGSTOP, SIGCONT, in a loop."""
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(period_s * (factor - 1) / factor)
            os.kill(pid, signal.SIGCONT)
            time.sleep(period_s / factor)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        os.kill(pid, signal.SIGCONT)


def generate(max_tokens: int, region: str = "west") -> rpc.GenerateRequest:
    return generate_request("routing test", region=region, max_tokens=max_tokens)


async def served_by(gateway, request: rpc.GenerateRequest) -> tuple[str, str, int]:
    """(backend address, region, tokens) of one whole generation."""
    call = gateway.Generate(request, timeout=30)
    tokens = 0
    async for chunk in call:
        tokens += chunk.response.token_count
    metadata = dict(await call.initial_metadata())
    return metadata["x-mlmesh-backend"], metadata["x-mlmesh-region"], tokens


@pytest.fixture
async def gateway(routing_mesh):
    async with mesh_channel(routing_mesh.address, routing_mesh.api_key) as channel:
        yield gateway_service_pb2_grpc.GatewayServiceStub(channel)


async def test_a_slow_replica_loses_its_traffic_within_two_seconds(routing_mesh, gateway):
    slow = services(routing_mesh)["llm"]
    slow_address = f"127.0.0.1:{slow['port']}"
    picks: list[tuple[float, str]] = []  # (start time, backend)
    stop_at = 0.0

    async def worker() -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            backend, _, tokens = await served_by(gateway, generate(10))
            assert tokens == 10
            picks.append((started, backend))

    stop_at = time.monotonic() + 2.0
    await asyncio.gather(*(worker() for _ in range(6)))
    before = [b for _, b in picks]
    assert before.count(slow_address) >= len(before) / 6, "the replica had no share to lose"
    picks.clear()
    with slowed_down(slow["pid"]):
        slowed_at = time.monotonic()
        stop_at = slowed_at + 5.0
        await asyncio.gather(*(worker() for _ in range(6)))
    after = [b for started, b in picks if started >= slowed_at + 2.0]
    share = after.count(slow_address) / len(after)
    # Convergence: from when on (in steps of 0.25 s) the slow replica got under 10%.
    converged = next(
        step * 0.25
        for step in range(40)
        if (window := [b for s, b in picks if s >= slowed_at + step * 0.25]).count(slow_address)
        <= 0.1 * len(window)
    )
    print(
        f"\nslow replica: {before.count(slow_address)}/{len(before)} requests before; "
        f"{after.count(slow_address)}/{len(after)} ({share:.1%}) of those started 2 s after "
        f"the 10x slowdown; under 10% from {converged:.2f} s on"
    )
    assert share <= 0.10, f"{share:.1%} of new requests still went to the slow replica"


async def test_a_saturated_region_spills_over_and_traffic_comes_back(routing_mesh, gateway):
    # Two west replicas hold SATURATION streams each; 3x that many at once
    # must spill to east.
    results = await asyncio.gather(
        *(served_by(gateway, generate(250)) for _ in range(3 * SATURATION))
    )
    regions = [region for _, region, _ in results]
    assert regions.count("east") >= SATURATION, regions
    assert regions.count("west") >= SATURATION, regions
    # The region drained: new requests are served at home again.
    back = [await served_by(gateway, generate(5)) for _ in range(6)]
    assert [region for _, region, _ in back] == ["west"] * 6


async def test_a_replica_killed_mid_stream_bills_what_was_sent(routing_mesh, gateway):
    async with mesh_channel(routing_mesh.address, routing_mesh.api_key) as channel:
        created = await key_service_pb2_grpc.KeyServiceStub(channel).CreateKey(
            keys_rpc.CreateKeyRequest(key=pb.Key(display_name="killed-mid-stream"))
        )
    async with mesh_channel(routing_mesh.address, created.secret) as channel:
        call = gateway_service_pb2_grpc.GatewayServiceStub(channel).Generate(
            generate(3000), timeout=60
        )
        received = 0
        killed = None
        with pytest.raises(grpc.RpcError) as caught:
            async for chunk in call:
                received += chunk.response.token_count
                if received == 100 and killed is None:
                    backend = dict(await call.initial_metadata())["x-mlmesh-backend"]
                    killed = instance_at(routing_mesh, backend)
                    pid = services(routing_mesh)[killed]["pid"]
                    os.kill(pid, signal.SIGKILL)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    assert 100 <= received < 3000
    # Exactly what reached the client is billed, once.
    await asyncio.sleep(0.5)  # the ledger writes within 100 ms
    async with mesh_channel(routing_mesh.address, routing_mesh.api_key) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        buckets = await usage_buckets(usage, created.key.id)
    assert sum(b.request_count for b in buckets) == 1
    assert sum(b.usage.completion_tokens for b in buckets) == received
    assert killed is not None
    await wait_restarted(routing_mesh, killed, pid)


async def test_a_replica_dying_before_the_first_token_is_retried_elsewhere(routing_mesh, gateway):
    east = services(routing_mesh)["llm.2"]
    os.kill(east["pid"], signal.SIGSTOP)  # takes the request, never answers
    try:
        pending = asyncio.ensure_future(served_by(gateway, generate(20, region="east")))
        await asyncio.sleep(1.0)
        assert not pending.done()
        os.kill(east["pid"], signal.SIGKILL)  # its connections reset, nothing sent
        backend, region, tokens = await asyncio.wait_for(pending, 20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(east["pid"], signal.SIGCONT)
    assert region == "west" and tokens == 20
    assert backend != f"127.0.0.1:{east['port']}"
    await wait_restarted(routing_mesh, "llm.2", east["pid"])


async def test_revoking_a_key_ends_its_open_generate_stream(routing_mesh):
    async with mesh_channel(routing_mesh.address, routing_mesh.api_key) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        created = await keys.CreateKey(
            keys_rpc.CreateKeyRequest(
                key=pb.Key(
                    display_name="revoked mid-stream",
                    scopes=pb.KeyScopes(
                        services=[pb.PLATFORM_SERVICE_GENERATE], model_patterns=["*"]
                    ),
                )
            )
        )
        async with mesh_channel(routing_mesh.address, created.secret) as user:
            gateway = gateway_service_pb2_grpc.GatewayServiceStub(user)
            call = gateway.Generate(generate(2000), timeout=30)  # about 4 s of tokens
            received = 0
            async for chunk in call:
                received += chunk.response.token_count
                if received >= 20:
                    break
            await keys.RevokeKey(keys_rpc.RevokeKeyRequest(id=created.key.id, reason="leaked"))
            revoked_at = time.monotonic()
            with pytest.raises(grpc.RpcError) as ended:
                async for chunk in call:
                    received += chunk.response.token_count
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() - revoked_at < 1.0
            assert received < 2000

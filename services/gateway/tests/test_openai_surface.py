"""The gateway's OpenAI-compatible surface, driven by the official ``openai``
client, against a real gateway (``build_server``: keys, throttle, ledger on
SQLite) whose models are backed by OpenAI-compatible upstreams: the fake
server (``mlmesh_gateway.fake_upstream``), which shows on demand the faults a
real one will not (429s, a stream cut half-way, a slow or dead endpoint).
The real ``vllm serve`` upstream is tested in the mesh
(tests/test_gateway_openai_mesh.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
from pathlib import Path

import aiohttp
import openai
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, key_service_pb2_grpc, usage_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as key_rpc
from mlmesh.gateway.v1 import usage_service_pb2 as usage_rpc
from mlmesh_chassis.auth import ServiceIdentity, service_identity, set_service_identity
from mlmesh_chassis.testing import bootstrap_keys_file, keyed_channel
from mlmesh_gateway.config import GatewaySettings
from mlmesh_gateway.fake_upstream import FakeUpstream
from mlmesh_gateway.server import build_server

UPSTREAM_SECRET = "upstream-secret-not-an-mlmesh-key"
S = pb.PlatformService


class Surface:
    """A running gateway, its upstreams and keys."""

    def __init__(self) -> None:
        self.url = ""
        self.grpc_target = ""
        self.fakes: dict[str, FakeUpstream] = {}
        self.keys: dict[str, tuple[str, str]] = {}  # name -> (id, secret)
        self.clients: dict[str, openai.AsyncOpenAI] = {}
        self.admin = ""

    def client(self, key: str = "main") -> openai.AsyncOpenAI:
        """The official client with a key (by name, or a raw secret); one each."""
        if key not in self.clients:
            secret = self.keys[key][1] if key in self.keys else key
            self.clients[key] = openai.AsyncOpenAI(base_url=self.url, api_key=secret, max_retries=0)
        return self.clients[key]

    async def usage(self, key: str = "main") -> dict[str, int]:
        """The key's ledger totals for today, as GetUsage reports them."""
        start = Timestamp()
        start.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        async with keyed_channel(self.grpc_target, self.keys[key][1]) as channel:
            reply = await usage_service_pb2_grpc.UsageServiceStub(channel).GetUsage(
                usage_rpc.GetUsageRequest(start_time=start)
            )
        totals = {"requests": 0, "errors": 0, "prompt": 0, "completion": 0}
        for bucket in reply.buckets:
            totals["requests"] += bucket.request_count
            totals["errors"] += bucket.error_count
            totals["prompt"] += bucket.usage.prompt_tokens
            totals["completion"] += bucket.usage.completion_tokens
        return totals


async def _create_key(target: str, admin: str, name: str, key: pb.Key) -> tuple[str, str]:
    key.display_name = name
    async with keyed_channel(target, admin) as channel:
        reply = await key_service_pb2_grpc.KeyServiceStub(channel).CreateKey(
            key_rpc.CreateKeyRequest(key=key)
        )
    return reply.key.id, reply.secret


@pytest.fixture(scope="module")
async def surface(tmp_path_factory) -> Surface:
    folder: Path = tmp_path_factory.mktemp("openai")
    held = service_identity()
    fakes = {
        name: FakeUpstream(tokens=16, api_key=UPSTREAM_SECRET, models=("fake-64",))
        for name in ("a1", "a2", "solo")
    }
    for fake in fakes.values():
        await fake.start()
    secret_file = folder / "upstream.key"
    secret_file.write_text(UPSTREAM_SECRET + "\n")
    secret_file.chmod(0o600)
    upstreams = {
        "fake-64": {
            "endpoints": [f"a={fakes['a1'].url}", f"a={fakes['a2'].url}"],
            "api_key_file": str(secret_file),
        },
        # Another gateway name for the same upstream model, on one endpoint.
        "solo": {
            "endpoints": [f"b={fakes['solo'].url}"],
            "upstream_model": "fake-64",
            "api_key_file": str(secret_file),
        },
    }
    bootstrap, admin = bootstrap_keys_file(folder, [S.PLATFORM_SERVICE_ADMIN])
    settings = GatewaySettings(
        database_url=f"sqlite+aiosqlite:///{folder}/gateway.db",
        port=0,
        metrics_port=-1,
        http_port=0,
        http_port_file=folder / "http.port",
        bootstrap_keys_file=bootstrap,
        openai_upstreams=json.dumps(upstreams),
        region="a",
        llm_models="",
        classic_models="",
        embedding_models="",
    )
    host = await build_server(settings)
    state = Surface()
    state.fakes = fakes
    state.admin = admin
    state.grpc_target = f"127.0.0.1:{host.port}"
    state.url = f"http://127.0.0.1:{(folder / 'http.port').read_text()}/v1"
    generate = pb.Key(
        scopes=pb.KeyScopes(services=[S.PLATFORM_SERVICE_GENERATE], model_patterns=["*"]),
        limits=pb.KeyLimits(requests_per_minute=10_000, tokens_per_minute=10_000_000),
    )
    state.keys["main"] = await _create_key(state.grpc_target, admin, "main", generate)
    state.keys["embed-only"] = await _create_key(
        state.grpc_target,
        admin,
        "embed-only",
        pb.Key(scopes=pb.KeyScopes(services=[S.PLATFORM_SERVICE_EMBED], model_patterns=["*"])),
    )
    state.keys["solo-only"] = await _create_key(
        state.grpc_target,
        admin,
        "solo-only",
        pb.Key(
            scopes=pb.KeyScopes(services=[S.PLATFORM_SERVICE_GENERATE], model_patterns=["solo"])
        ),
    )
    state.keys["one-a-minute"] = await _create_key(
        state.grpc_target,
        admin,
        "one-a-minute",
        pb.Key(
            scopes=pb.KeyScopes(services=[S.PLATFORM_SERVICE_GENERATE], model_patterns=["*"]),
            limits=pb.KeyLimits(requests_per_minute=1),
        ),
    )
    yield state
    for client in state.clients.values():
        await client.close()
    await host.shutdown()
    for fake in fakes.values():
        await fake.close()
    set_service_identity(held if isinstance(held, ServiceIdentity) else ServiceIdentity(None))


@pytest.fixture(autouse=True)
def _clean_faults(surface: Surface):
    for fake in surface.fakes.values():
        fake.reset()
    yield
    for fake in surface.fakes.values():
        fake.reset()


async def test_chat_completion_through_an_upstream_is_billed_its_reported_usage(surface):
    before = await surface.usage()
    reply = await surface.client().chat.completions.create(
        model="fake-64", messages=[{"role": "user", "content": "one two three"}], max_tokens=5
    )
    assert reply.choices[0].message.content == "tok " * 5
    assert reply.choices[0].finish_reason == "length"
    assert reply.id.startswith("chatcmpl-")
    # The fake counts prompt words; the gateway bills what the upstream reported.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 5)
    sent = [r for f in surface.fakes.values() for r in f.requests]
    # A caller waiting for the whole answer: the upstream sends it whole too.
    assert len(sent) == 1 and not sent[0]["stream"] and sent[0]["max_tokens"] == 5
    # The upstream got its own credential, never the caller's key.
    expected = hashlib.sha256(f"Bearer {UPSTREAM_SECRET}".encode()).hexdigest()
    assert sent[0]["authorization_sha256"] == expected
    after = await surface.usage()
    assert after["requests"] == before["requests"] + 1
    assert after["prompt"] - before["prompt"] == 3
    assert after["completion"] - before["completion"] == 5


async def test_streamed_chat_relays_every_chunk_and_the_usage(surface):
    stream = await surface.client().chat.completions.create(
        model="solo",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(texts) == "tok " * 7
    assert finish == "length"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 7)
    # "solo" is the gateway's name; the upstream was asked for its own.
    assert surface.fakes["solo"].requests[-1]["model"] == "fake-64"


async def test_text_completion_streams_and_completes(surface):
    client = surface.client()
    whole = await client.completions.create(model="fake-64", prompt="a b", max_tokens=3)
    assert whole.choices[0].text == "tok " * 3 and whole.usage.completion_tokens == 3
    pieces = []
    async for chunk in await client.completions.create(
        model="fake-64", prompt="a b", max_tokens=4, stream=True
    ):
        pieces.extend(c.text for c in chunk.choices)
    assert "".join(pieces) == "tok " * 4


async def test_models_lists_per_key_what_it_may_call_and_where(surface):
    listed = await surface.client().models.list()
    described = {m.id: m.model_extra["mlmesh"] for m in listed.data}
    assert set(described) == {"fake-64", "solo"}
    assert described["fake-64"]["backend"] == "openai_compatible"
    assert described["fake-64"]["regions"] == ["a"] and described["solo"]["regions"] == ["b"]
    assert "chat" in described["solo"]["capabilities"]
    only = await surface.client("solo-only").models.list()
    assert [m.id for m in only.data] == ["solo"]
    assert (await surface.client("embed-only").models.list()).data == []
    assert (await surface.client().models.retrieve("solo")).id == "solo"
    with pytest.raises(openai.NotFoundError):
        await surface.client("solo-only").models.retrieve("fake-64")
    # The gRPC API lists the same.
    async with keyed_channel(surface.grpc_target, surface.keys["main"][1]) as channel:
        reply = await gateway_service_pb2_grpc.GatewayServiceStub(channel).ListModels(
            rpc.ListModelsRequest()
        )
    assert {(m.model, m.backend) for m in reply.models} == {
        ("fake-64", pb.MODEL_BACKEND_OPENAI_COMPATIBLE),
        ("solo", pb.MODEL_BACKEND_OPENAI_COMPATIBLE),
    }


async def _raw(surface: Surface, body: object, key: str | None = "main") -> tuple[int, dict]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {surface.keys[key][1]}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{surface.url}/chat/completions", data=data, headers=headers) as reply,
    ):
        return reply.status, await reply.json()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", "body"),
        ({"model": "fake-64"}, "messages"),
        ({"model": "fake-64", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"model": "fake-64", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        (
            {"model": "fake-64", "messages": [{"role": "user", "content": "x"}], "temperature": 5},
            "temperature",
        ),
        (
            {"model": "fake-64", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 9},
            "stop",
        ),
        ({"model": "Bad Name!", "messages": [{"role": "user", "content": "x"}]}, "model"),
        (
            {"model": "fake-64", "messages": [{"role": "user", "content": "x" * (600 * 1024)}]},
            "messages[0].content",
        ),
    ],
)
async def test_bad_requests_get_400_naming_the_parameter_and_reach_no_upstream(
    surface, body, param
):
    status, reply = await _raw(surface, body)
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"].startswith(param), reply
    assert reply["error"]["mlmesh"]["field_violations"]
    assert len(reply["error"]["message"]) <= 1100  # a long value is not echoed whole
    assert all(not f.requests for f in surface.fakes.values())


async def test_keys_are_checked_in_process_401_and_403(surface):
    messages = [{"role": "user", "content": "x"}]
    status, reply = await _raw(surface, {"model": "fake-64", "messages": messages}, key=None)
    assert status == 401 and reply["error"]["code"] == "api_key_missing"
    with pytest.raises(openai.AuthenticationError):
        await surface.client("mlm_0123456789abcdef_" + "x" * 32).chat.completions.create(
            model="fake-64", messages=messages
        )
    with pytest.raises(openai.PermissionDeniedError):
        await surface.client("embed-only").chat.completions.create(
            model="fake-64", messages=messages
        )
    with pytest.raises(openai.PermissionDeniedError):  # a model outside its patterns
        await surface.client("solo-only").chat.completions.create(
            model="fake-64", messages=messages
        )
    assert all(not f.requests for f in surface.fakes.values())


async def test_the_throttle_answers_429_with_the_real_wait(surface):
    client = surface.client("one-a-minute")
    messages = [{"role": "user", "content": "x"}]
    await client.chat.completions.create(model="fake-64", messages=messages, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="fake-64", messages=messages, max_tokens=1)
    headers = refused.value.response.headers
    wait_ms = int(headers["retry-after-ms"])
    assert 0 < wait_ms <= 60_000
    assert int(headers["retry-after"]) == -(-wait_ms // 1000)  # whole seconds, rounded up
    body = refused.value.body
    assert body["mlmesh"]["quota_violations"] and body["mlmesh"]["retry_after_s"] > 0


async def test_an_upstreams_429_is_retried_elsewhere_then_passed_on(surface):
    client = surface.client()
    messages = [{"role": "user", "content": "x"}]
    # fake-64 has two endpoints: one refusing is invisible to the caller.
    surface.fakes["a1"].set_faults(status=429, retry_after=1)
    for _ in range(3):
        reply = await client.chat.completions.create(
            model="fake-64", messages=messages, max_tokens=2
        )
        assert reply.choices[0].message.content == "tok tok "
    # solo's only endpoint refusing: the caller gets 429 and the upstream's wait.
    surface.fakes["solo"].set_faults(status=429, retry_after=3)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="solo", messages=messages, max_tokens=2)
    assert refused.value.response.headers["retry-after"] == "3"


async def test_a_dead_upstream_is_503_and_a_failing_one_is_skipped(surface):
    client = surface.client()
    messages = [{"role": "user", "content": "x"}]
    surface.fakes["a1"].set_faults(status=502)
    # One endpoint failing: each request that tries it goes on to the other
    # before anything was sent, and the failing one is ejected for a while.
    for _ in range(4):
        reply = await client.chat.completions.create(
            model="fake-64", messages=messages, max_tokens=1
        )
        assert reply.choices[0].message.content == "tok "
    assert len(surface.fakes["a1"].requests) <= 2 and len(surface.fakes["a2"].requests) == 4
    surface.fakes["solo"].set_faults(status=500)
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="solo", messages=messages, max_tokens=1)
    assert failed.value.status_code == 503
    assert "retry-after" in failed.value.response.headers


async def test_a_stream_cut_half_way_ends_with_an_error_and_bills_what_was_sent(surface):
    before = await surface.usage()
    surface.fakes["solo"].set_faults(kill_after_chunks=4)
    stream = await surface.client().chat.completions.create(
        model="solo", messages=[{"role": "user", "content": "x"}], max_tokens=10, stream=True
    )
    received = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            received.extend(c.delta.content or "" for c in chunk.choices)
    assert 0 < "".join(received).count("tok") < 10
    after = await surface.usage()
    assert after["errors"] == before["errors"] + 1
    # Billed: the chunks relayed (no usage came), not the reservation.
    assert 0 < after["completion"] - before["completion"] < 10


async def test_usage_is_counted_here_when_the_upstream_reports_none(surface):
    surface.fakes["solo"].set_faults(omit_usage=True)
    stream = await surface.client().chat.completions.create(
        model="solo",
        messages=[{"role": "user", "content": "x y"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
    # One token per streamed event (no tokenizer is held for it); the prompt
    # at its byte bound, never under the real count.
    assert usage[-1].completion_tokens == 6
    assert usage[-1].prompt_tokens >= 3
    # A whole answer without usage is billed at most a token per byte.
    reply = await surface.client().chat.completions.create(
        model="solo", messages=[{"role": "user", "content": "x y"}], max_tokens=6
    )
    assert 6 <= reply.usage.completion_tokens <= len("tok " * 6)


async def test_cancelling_mid_stream_stops_the_upstream_and_refunds(surface):
    surface.fakes["solo"].set_faults(chunk_delay_ms=50)
    before = await surface.usage()
    stream = await surface.client().chat.completions.create(
        model="solo", messages=[{"role": "user", "content": "x"}], max_tokens=16, stream=True
    )
    seen = 0
    async for chunk in stream:
        seen += sum(1 for c in chunk.choices if c.delta.content)
        if seen >= 2:
            break
    await stream.close()
    for _ in range(100):  # the gateway settles once it sees the client go
        after = await surface.usage()
        if after["requests"] > before["requests"]:
            break
        await asyncio.sleep(0.05)
    assert after["requests"] == before["requests"] + 1
    assert after["completion"] - before["completion"] < 16


async def test_a_key_revoked_mid_stream_ends_the_stream(surface):
    key_id, secret = await _create_key(
        surface.grpc_target,
        surface.admin,
        "revoked-soon",
        pb.Key(scopes=pb.KeyScopes(services=[S.PLATFORM_SERVICE_GENERATE], model_patterns=["*"])),
    )
    surface.fakes["solo"].set_faults(chunk_delay_ms=100)
    client = openai.AsyncOpenAI(base_url=surface.url, api_key=secret, max_retries=0)
    stream = await client.chat.completions.create(
        model="solo", messages=[{"role": "user", "content": "x"}], max_tokens=16, stream=True
    )
    received = 0
    with pytest.raises(openai.APIError) as ended:
        async for chunk in stream:
            received += sum(1 for c in chunk.choices if c.delta.content)
            if received == 2:
                async with keyed_channel(surface.grpc_target, surface.admin) as channel:
                    await key_service_pb2_grpc.KeyServiceStub(channel).RevokeKey(
                        key_rpc.RevokeKeyRequest(id=key_id)
                    )
    assert "stopped authenticating" in str(ended.value)
    assert received < 16
    await client.close()


async def test_a_slow_endpoint_loses_the_traffic(surface):
    client = surface.client()
    messages = [{"role": "user", "content": "x"}]
    # Earlier tests may have left a1 ejected: warm up until both answer.
    for _ in range(200):
        await client.chat.completions.create(model="fake-64", messages=messages, max_tokens=1)
        if surface.fakes["a1"].requests and surface.fakes["a2"].requests:
            break
        await asyncio.sleep(0.05)
    surface.fakes["a2"].set_faults(latency_ms=150)
    for fake in surface.fakes.values():
        fake.requests.clear()
    # A slow answer moves the endpoint's estimate at most 4x (one stall must
    # not condemn it): within a dozen requests it has lost the traffic.
    for _ in range(12):
        await client.chat.completions.create(model="fake-64", messages=messages, max_tokens=1)
    for fake in surface.fakes.values():
        fake.requests.clear()
    for _ in range(12):
        await client.chat.completions.create(model="fake-64", messages=messages, max_tokens=1)
    fast = len(surface.fakes["a1"].requests)
    slow = len(surface.fakes["a2"].requests)
    assert fast + slow == 12 and fast >= 11, (fast, slow)

"""Metering no caller can dodge, through the real GatewayServicer on a real
server (in-process llm doubles from test_routing, SQLite ledger): a reused
request id neither merges calls nor crosses keys; caller-supplied values are
checked before anything is reserved."""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy as sa
from keyring import Keyring, migrated_gateway_db
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, usage_service_pb2
from mlmesh.llm.v1 import llm_service_pb2_grpc
from mlmesh.registry.v1 import model_pb2
from mlmesh.registry.v1.model_pb2 import ModelVersion
from mlmesh_chassis.generation import MAX_PROMPT_BYTES
from mlmesh_chassis.testing import expect_error
from mlmesh_gateway.balancer import LatencyAwareBalancer
from mlmesh_gateway.servicer import GatewayServicer
from mlmesh_gateway.usage_servicer import UsageServicer
from mlmesh_metering import Metering, Throttle
from mlmesh_metering.events import UsageEvent
from mlmesh_metering.ledger import UsageLedger, usage_events
from mlmesh_metering.remote import RemoteUsageSink
from mlmesh_sdk.channel import mesh_channel
from mlmesh_serving import ServedVersions
from test_routing import FakeLlm, request

GENERATE = pb.KeyScopes(services=[pb.PLATFORM_SERVICE_GENERATE], model_patterns=["*"])


class ExperimentDirectory:
    """The registry as the gateway follows it: every reference at version 1,
    and the model's running experiment (none until a test sets one)."""

    def __init__(self) -> None:
        self.running: model_pb2.Experiment | None = None

    async def served(self, model: str, alias: str = "") -> ServedVersions:
        running = (self.running,) if self.running is not None else ()
        return ServedVersions(ModelVersion(model=model, version=1), frozenset(), running)

    async def reread(self, model: str, alias: str = "") -> ServedVersions:
        return await self.served(model, alias)


@pytest.fixture
async def gateway(tmp_path):
    """(address, keys, ledger, fake llm, directory) for a gateway with one
    llm endpoint."""
    fake = FakeLlm("a1")
    database = await migrated_gateway_db(f"sqlite+aiosqlite:///{tmp_path}/g.db")
    keys = await Keyring.open(database, tmp_path)
    llm_host, llm_port = await keys.serve(
        fake, llm_service_pb2_grpc.add_LlmServiceServicer_to_server
    )
    balancer = LatencyAwareBalancer.from_spec(f"a=127.0.0.1:{llm_port}", home_region="a")
    ledger = UsageLedger(database)
    meter = Metering(Throttle(), ledger, pb.PLATFORM_SERVICE_GENERATE)
    directory = ExperimentDirectory()
    servicer = GatewayServicer(
        meter,
        balancer,
        None,
        ["tiny-llama"],
        [],
        [],
        directory=directory,  # type: ignore[arg-type]
    )
    servicer.llm_split.loaded.ttl_s = 0.0  # tests change what is loaded at once
    usage = UsageServicer(ledger)

    def add(_, server):
        gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        from mlmesh.gateway.v1 import usage_service_pb2_grpc

        usage_service_pb2_grpc.add_UsageServiceServicer_to_server(usage, server)

    host, port = await keys.serve(None, add)
    yield f"127.0.0.1:{port}", keys, ledger, fake, directory
    await ledger.close()
    await balancer.close()
    await host.shutdown()
    await llm_host.shutdown()
    await keys.close()
    await database.close()


async def _key(keys: Keyring, **limits) -> tuple[str, str]:
    key, secret = await keys.create(
        pb.Key(display_name="t", scopes=GENERATE, limits=pb.KeyLimits(**limits))
    )
    return key.id, secret


async def _rows(ledger: UsageLedger, request_id: str) -> list:
    await ledger.flush()
    async with ledger.db.read() as c:
        return (
            await c.execute(sa.select(usage_events).where(usage_events.c.request_id == request_id))
        ).all()


async def test_reusing_a_request_id_is_limited_and_billed_per_call(gateway):
    address, keys, ledger, _, _ = gateway
    key_id, secret = await _key(keys, tokens_per_minute=3000)
    admitted = rejected = 0
    async with mesh_channel(address, secret) as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        for _ in range(10):  # 3 + 1000 reserved each: 2 fit in 3000
            try:
                [c async for c in stub.Generate(request(tokens=1000, request_id="same"))]
                admitted += 1
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                rejected += 1
    assert (admitted, rejected) == (2, 8)
    rows = await _rows(ledger, "same")
    assert len(rows) == 2  # every admitted call billed, each under its own event id
    assert len({r.event_id for r in rows}) == 2 and all(r.key_id == key_id for r in rows)
    assert sum(r.quantity for r in rows) == 2 * (3 + 1000)


async def test_two_keys_reusing_one_id_are_each_billed_their_own(gateway):
    address, keys, ledger, _, _ = gateway
    billed = {}
    for name in ("first", "second"):
        key_id, secret = await _key(keys)
        async with mesh_channel(address, secret) as channel:
            stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
            [c async for c in stub.Generate(request(tokens=7, request_id="shared-id"))]
        billed[name] = key_id
    rows = await _rows(ledger, "shared-id")
    assert sorted((r.key_id, r.completion_tokens) for r in rows) == sorted(
        (k, 7) for k in billed.values()
    )


async def test_a_reused_id_does_not_dodge_the_daily_quota(gateway):
    address, keys, _, _, _ = gateway
    _, secret = await _key(keys, token_quota=2100)
    async with mesh_channel(address, secret) as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        for _ in range(2):  # 1003 each, settled and billed
            [c async for c in stub.Generate(request(tokens=1000, request_id="q"))]
        details = await expect_error(
            _drain(stub.Generate(request(tokens=1000, request_id="q"))),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    assert details.quota_failure.violations[0].description == "token_quota"


@pytest.mark.parametrize(
    ("request_id", "field"),
    [
        ("x" * 129, "request.request_id"),
        ("ok\n", "request.request_id"),  # `$` would have let the newline through
        ("caf\u00e9", "request.request_id"),
    ],
)
async def test_bad_request_ids_are_refused_before_admission(gateway, request_id, field):
    address, keys, ledger, fake, _ = gateway
    _, secret = await _key(keys)
    async with mesh_channel(address, secret) as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        details = await expect_error(
            _drain(stub.Generate(request(request_id=request_id))),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    assert [v.field for v in details.bad_request.field_violations] == [field]
    assert fake.calls == 0 and ledger.pending == 0  # nothing reserved, nothing billed


async def test_a_prompt_over_the_cap_is_refused_before_counting_tokens(gateway):
    address, keys, _, fake, _ = gateway
    _, secret = await _key(keys)
    big = request()
    big.request.text = "x" * (MAX_PROMPT_BYTES + 1)
    async with mesh_channel(address, secret) as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        details = await expect_error(_drain(stub.Generate(big)), grpc.StatusCode.INVALID_ARGUMENT)
    assert details.bad_request.field_violations[0].field == "request.text"
    assert fake.calls == 0


async def test_record_usage_is_idempotent_and_needs_its_scope(gateway):
    address, keys, ledger, _, _ = gateway
    _, plain = await _key(keys)
    _, secret = await keys.create(
        pb.Key(
            display_name="vectors",
            scopes=pb.KeyScopes(services=[pb.PLATFORM_SERVICE_USAGE_RECORD]),
        )
    )
    event = UsageEvent(
        key_id="k1",
        call_id="c1",
        request_id="their-id",
        service=pb.PLATFORM_SERVICE_VECTORS,
        unit="vectors",
        quantity=12,
    )
    async with mesh_channel(address, plain) as channel:
        from mlmesh.gateway.v1 import usage_service_pb2_grpc

        stub = usage_service_pb2_grpc.UsageServiceStub(channel)
        await expect_error(
            stub.RecordUsage(usage_service_pb2.RecordUsageRequest()),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    async with mesh_channel(address, secret) as channel:
        sink = RemoteUsageSink(address, secret, channel=channel)
        for _ in range(2):  # a retried batch: recorded once
            await sink.record(event)
            await sink.flush()
        stub = usage_service_pb2_grpc.UsageServiceStub(channel)
        bad = usage_service_pb2.RecordUsageRequest(
            events=[usage_service_pb2.MeteredEvent(event_id="e\n", key_id="k1", unit="rows")]
        )
        details = await expect_error(stub.RecordUsage(bad), grpc.StatusCode.INVALID_ARGUMENT)
    fields = {v.field for v in details.bad_request.field_violations}
    assert {"events[0].event_id", "events[0].call_id", "events[0].service"} <= fields
    rows = await _rows(ledger, "their-id")
    assert [(r.key_id, r.unit, r.quantity) for r in rows] == [("k1", "vectors", 12)]


async def _drain(call) -> None:
    async for _ in call:
        pass


async def test_an_arm_the_llm_has_not_loaded_yet_is_served_as_asked(gateway):
    """An experiment starts before the llm has loaded its arm's version: the
    caller gets the reference as asked (no NOT_FOUND), then the arm once it
    is loaded."""
    address, keys, _, fake, directory = gateway
    fake.loaded_versions = {1}
    directory.running = model_pb2.Experiment(
        name="tl-ab",
        model="tiny-llama",
        arms=[model_pb2.ExperimentArm(name="treatment", version=9, weight=100)],
    )
    _, secret = await _key(keys)
    async with mesh_channel(address, secret) as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        chunks = [c async for c in stub.Generate(request(3))]
        assert chunks[0].response.model.version == 1
        assert fake.asked_versions[-1] == 0  # the alias, as the caller asked
        fake.loaded_versions.add(9)
        chunks = [c async for c in stub.Generate(request(3))]
        assert chunks[0].response.model.version == 9
        assert fake.asked_versions[-1] == 9


async def test_get_usage_reads_the_callers_own_key_unless_it_names_others(gateway):
    """Straight on the servicer, as the chassis hands it a verified caller."""
    from mlmesh_chassis.auth import Principal, principal_var
    from mlmesh_chassis.errors import PermissionDenied

    address, keys, ledger, _, _ = gateway
    user_id, user = await _key(keys)
    admin, admin_secret = await keys.create(
        pb.Key(display_name="admin", scopes=pb.KeyScopes(services=[pb.PLATFORM_SERVICE_ADMIN]))
    )
    for secret in (user, admin_secret):
        async with mesh_channel(address, secret) as channel:
            stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
            await _drain(stub.Generate(request(2)))
    usage = UsageServicer(ledger)
    since = usage_service_pb2.GetUsageRequest()
    since.start_time.GetCurrentTime()
    since.start_time.seconds -= 600  # no end_time: until now
    named = usage_service_pb2.GetUsageRequest(key_ids=[user_id])
    named.start_time.CopyFrom(since.start_time)
    principal_var.set(Principal(admin, ""))
    own = await usage.GetUsage(since, None)
    assert {b.key_id for b in own.buckets} == {admin.id}
    other = await usage.GetUsage(named, None)
    assert {b.key_id for b in other.buckets} == {user_id}
    assert other.buckets[0].usage.completion_tokens == 2
    principal_var.set(Principal(pb.Key(id=user_id, scopes=GENERATE), ""))
    assert {b.key_id for b in (await usage.GetUsage(since, None)).buckets} == {user_id}
    with pytest.raises(PermissionDenied):  # another key's usage needs ADMIN
        await usage.GetUsage(
            usage_service_pb2.GetUsageRequest(key_ids=[admin.id], start_time=since.start_time),
            None,
        )

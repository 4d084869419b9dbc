"""Admission: quota, throttle, settle and ledger around one call, the same
for Generate, Infer and Embed (a real throttle and a SQLite ledger)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from keyring import migrated_gateway_db
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.errors import NotFound, ResourceExhausted
from mlmesh_chassis.metrics import REGISTRY
from mlmesh_gateway.admission import Admission
from mlmesh_metering import Metering, Throttle
from mlmesh_metering.events import UsageEvent
from mlmesh_metering.ledger import UsageLedger, usage_events

GENERATE, INFER, EMBED = (
    pb.PLATFORM_SERVICE_GENERATE,
    pb.PLATFORM_SERVICE_INFER,
    pb.PLATFORM_SERVICE_EMBED,
)


@pytest.fixture
async def admission(tmp_path):
    database = await migrated_gateway_db(f"sqlite+aiosqlite:///{tmp_path}/g.db")
    throttle = Throttle()
    ledger = UsageLedger(database)
    yield Admission(Metering(throttle, ledger, GENERATE)), throttle
    await ledger.close()
    await database.close()


def key(key_id: str = "key_a", **limits: int) -> pb.Key:
    return pb.Key(id=key_id, limits=pb.KeyLimits(**limits))


def requests_counted(service: str, model: str, code: str) -> float:
    labels = {"service": service, "model": model, "code": code}
    return REGISTRY.get_sample_value("mlmesh_gateway_requests_total", labels) or 0.0


async def events(admission: Admission) -> list:
    await admission.ledger.flush()
    async with admission.ledger.db.read() as c:
        return list((await c.execute(sa.select(usage_events))).all())


async def test_each_service_is_settled_and_recorded_in_its_unit(admission):
    gate, _ = admission
    before = requests_counted("embed", "m-embed", "OK")
    async with gate(key(), GENERATE, "m-gen", reserve=20, request_id="r1") as call:
        call.prompt_tokens, call.completion_tokens = 3, 4
    async with gate(key(), INFER, "m-infer") as call:
        call.input_items = 64
    async with gate(key(), EMBED, "m-embed") as call:
        call.input_items, call.prompt_tokens = 2, 9
    rows = {r.model: r for r in await events(gate)}
    assert (rows["m-gen"].unit, rows["m-gen"].quantity, rows["m-gen"].request_id) == (
        "tokens",
        7,
        "r1",
    )
    assert (rows["m-infer"].unit, rows["m-infer"].quantity) == ("items", 64)
    assert (rows["m-embed"].unit, rows["m-embed"].quantity, rows["m-embed"].prompt_tokens) == (
        "tokens",
        9,
        9,
    )
    assert all(r.status == "OK" for r in rows.values())
    assert requests_counted("embed", "m-embed", "OK") == before + 1


async def test_a_failed_call_is_recorded_with_its_status_and_still_billed(admission):
    gate, _ = admission
    before = requests_counted("infer", "m-fail", "NOT_FOUND")
    with pytest.raises(NotFound):
        async with gate(key(), INFER, "m-fail") as call:
            call.input_items = 5
            raise NotFound("model", "m-fail")
    [row] = await events(gate)
    assert (row.status, row.quantity) == ("NOT_FOUND", 5)
    assert requests_counted("infer", "m-fail", "NOT_FOUND") == before + 1


async def test_a_cancelled_stream_settles_what_it_used(admission):
    gate, throttle = admission
    started = asyncio.Event()

    async def stream() -> None:
        async with gate(key(tokens_per_minute=1000), GENERATE, "m-cancel", reserve=100) as call:
            call.prompt_tokens, call.completion_tokens = 2, 3
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(stream())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [row] = await events(gate)
    assert (row.status, row.quantity) == ("CANCELLED", 5)
    assert await throttle.local.used("key:key_a") == 5  # the reservation of 100 settled to 5


async def test_the_token_quota_is_read_from_the_ledger_before_admission(admission):
    gate, _ = admission
    await gate.ledger.record(
        UsageEvent(key_id="key_q", call_id="c0", service=GENERATE, model="m", quantity=90)
    )
    quota = key("key_q", token_quota=100, token_quota_period=pb.QUOTA_PERIOD_DAY)
    per_key = {"key_id": "key_q", "limit": "token_quota"}
    before = REGISTRY.get_sample_value("mlmesh_throttle_rejections_total", per_key) or 0.0
    for service in (GENERATE, EMBED):
        with pytest.raises(ResourceExhausted) as refused:
            async with gate(quota, service, "m", reserve=20):
                pass
        assert refused.value.violations[0].description == "token_quota"
    assert REGISTRY.get_sample_value("mlmesh_throttle_rejections_total", per_key) == before + 2
    async with gate(quota, INFER, "m"):  # items are not tokens: no quota
        pass
    async with gate(quota, GENERATE, "m", reserve=10):  # 90 + 10 fits
        pass


async def test_a_throttled_call_is_refused_before_it_runs(admission):
    gate, _ = admission
    limited = key("key_r", requests_per_minute=1)
    async with gate(limited, EMBED, "m-rpm"):
        pass
    ran = False
    with pytest.raises(ResourceExhausted):
        async with gate(limited, EMBED, "m-rpm"):
            ran = True
    assert not ran
    assert len(await events(gate)) == 1

"""Metering every verified call of a service (the chassis' admission hook):
the key's requests per minute, and one valid usage event per admitted call."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.auth import Principal
from mlmesh_chassis.context import deadline_var, remaining_time
from mlmesh_chassis.errors import ResourceExhausted
from mlmesh_chassis.validation import violations_of
from mlmesh_metering.batcher import UsageBatcher
from mlmesh_metering.events import UsageEvent
from mlmesh_metering.metering import Metering, call_admission
from mlmesh_metering.remote import to_message
from mlmesh_metering.throttle import Throttle


class Collected(UsageBatcher):
    """A sink that keeps what it is given, each event checked against the
    contract's rules for a MeteredEvent (what RecordUsage would accept)."""

    def __init__(self) -> None:
        super().__init__(flush_s=0.01)
        self.events: list[UsageEvent] = []

    async def _write(self, events: list[UsageEvent]) -> None:
        for event in events:
            assert not violations_of(to_message(event)), violations_of(to_message(event))
        self.events.extend(events)


async def test_each_call_counts_against_the_key_and_is_recorded_once():
    sink = Collected()
    admit = call_admission(Metering(Throttle(), sink, pb.PLATFORM_SERVICE_REGISTRY))
    key = pb.Key(id="0123456789abcdef", limits=pb.KeyLimits(requests_per_minute=3))
    principal = Principal(key, "0" * 64)
    for _ in range(3):
        async with admit(principal, "/mlmesh.registry.v1.RegistryService/ListModels"):
            pass
    with pytest.raises(ResourceExhausted) as refused:
        async with admit(principal, "/mlmesh.registry.v1.RegistryService/ListModels"):
            pass
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await sink.flush()
    assert [(e.key_id, e.unit, e.quantity) for e in sink.events] == [
        ("0123456789abcdef", "requests", 1)
    ] * 3
    assert len({e.call_id for e in sink.events}) == 3
    await sink.close()


class Deadlines(Collected):
    """Remembers what deadline each write ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.remaining: list[float | None] = []

    async def _write(self, events: list[UsageEvent]) -> None:
        self.remaining.append(remaining_time())
        await super()._write(events)


async def test_writes_never_run_under_the_first_callers_deadline():
    sink = Deadlines()

    async def a_call_with_a_deadline_long_gone() -> None:
        deadline_var.set(time.monotonic() - 1)
        await sink.record(
            UsageEvent(key_id="k", call_id="c1", service=pb.PLATFORM_SERVICE_REGISTRY)
        )

    await asyncio.create_task(a_call_with_a_deadline_long_gone())
    await asyncio.sleep(0.1)
    assert sink.events and sink.remaining == [None]
    await sink.close()


async def test_keys_billed_elsewhere_pass_unmetered_and_no_one_else_does():
    sink = Collected()
    gateway = pb.Key(id="feedfacefeedface", limits=pb.KeyLimits(requests_per_minute=1))
    other = pb.Key(id="0123456789abcdef", limits=pb.KeyLimits(requests_per_minute=1))
    admit = call_admission(
        Metering(Throttle(), sink, pb.PLATFORM_SERVICE_LLM), frozenset({gateway.id})
    )
    for _ in range(3):  # its limit does not apply here: the gateway bills its calls
        async with admit(Principal(gateway, "0" * 64), "/mlmesh.llm.v1.LlmService/Generate"):
            pass
    async with admit(Principal(other, "0" * 64), "/mlmesh.llm.v1.LlmService/Generate"):
        pass
    with pytest.raises(ResourceExhausted):
        async with admit(Principal(other, "0" * 64), "/mlmesh.llm.v1.LlmService/Generate"):
            pass
    await sink.flush()
    assert [(e.key_id, e.service) for e in sink.events] == [
        ("0123456789abcdef", pb.PLATFORM_SERVICE_LLM)
    ]
    await sink.close()

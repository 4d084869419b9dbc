"""Token throttling: exact windows, in-process and in a real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
from mlmesh_gateway.throttle import Limits, LocalThrottle, Throttle


@pytest.fixture(params=["local", "redis"])
async def throttle(request, redis_server):
    url, _stop, _start = redis_server
    if request.param == "local":
        yield Throttle()
    else:
        shared = Throttle(url, redis_timeout_s=5.0)
        try:
            await shared.redis._redis.flushall()
            yield shared
        finally:
            await shared.close()


async def test_reservations_never_exceed_the_window(throttle):
    limits = Limits(tokens_per_minute=1000)
    admitted = []
    for i in range(30):
        decision = await throttle.admit("key:a", f"r{i}", 100, limits)
        if decision.admitted:
            admitted.append(f"r{i}")
        else:
            assert decision.violated == "tokens_per_minute"
            assert 0 < decision.retry_after_s <= 60
    assert len(admitted) == 10  # 10 x 100 fits, the 11th would not


async def test_settling_returns_what_was_not_used(throttle):
    limits = Limits(tokens_per_minute=1000)
    assert (await throttle.admit("key:b", "big", 900, limits)).admitted
    assert not (await throttle.admit("key:b", "next", 200, limits)).admitted
    await throttle.settle("key:b", "big", 300)  # it streamed fewer tokens than reserved
    assert (await throttle.admit("key:b", "next", 200, limits)).admitted


async def test_requests_and_concurrent_streams(throttle):
    limits = Limits(requests_per_minute=3, max_concurrent_streams=2)
    assert (await throttle.admit("key:c", "1", 1, limits)).admitted
    assert (await throttle.admit("key:c", "2", 1, limits)).admitted
    full = await throttle.admit("key:c", "3", 1, limits)
    assert not full.admitted and full.violated == "concurrent_streams"
    await throttle.settle("key:c", "1", 1)  # a stream ended
    assert (await throttle.admit("key:c", "3", 1, limits)).admitted
    await throttle.settle("key:c", "2", 1)
    over = await throttle.admit("key:c", "4", 1, limits)
    assert not over.admitted and over.violated == "requests_per_minute"


async def test_replicas_share_one_budget_through_redis(redis_server):
    url, _stop, _start = redis_server
    # A generous timeout: this test is about sharing one budget, not about a
    # slow Redis on a loaded CI machine (the fallback test covers that).
    replicas = [Throttle(url, replicas=3, redis_timeout_s=5.0) for _ in range(3)]
    try:
        await replicas[0].redis._redis.flushall()
        limits = Limits(tokens_per_minute=5000)
        decisions = await asyncio.gather(
            *(replicas[i % 3].admit("key:shared", f"r{i}", 100, limits) for i in range(120))
        )
        assert {d.backend for d in decisions} == {"redis"}
        assert sum(d.admitted for d in decisions) == 50
    finally:
        for replica in replicas:
            await replica.close()


async def test_redis_down_falls_back_to_local_limits_per_replica(redis_server):
    url, stop, start = redis_server
    throttle = Throttle(url, replicas=2, redis_timeout_s=5.0)
    limits = Limits(tokens_per_minute=1000)
    stop()
    try:
        started = time.monotonic()
        decisions = [await throttle.admit("key:d", f"r{i}", 100, limits) for i in range(8)]
        assert time.monotonic() - started < 2  # no hang
        assert {d.backend for d in decisions} == {"local"}
        assert sum(d.admitted for d in decisions) == 5  # 1000 / 2 replicas
    finally:
        start()
    try:
        await asyncio.sleep(1.1)  # the next decision tries Redis again
        assert (await throttle.admit("key:d", "back", 100, limits)).backend == "redis"
    finally:
        await throttle.close()


async def test_local_window_frees_budget_after_a_minute(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("mlmesh_gateway.throttle.time.monotonic", lambda: clock[0])
    local = LocalThrottle()
    limits = Limits(tokens_per_minute=100)
    assert (await local.admit("k", "a", 100, limits)).admitted
    clock[0] += 30
    denied = await local.admit("k", "b", 50, limits)
    assert not denied.admitted and denied.retry_after_s == pytest.approx(30)
    clock[0] += 30.01
    assert (await local.admit("k", "b", 50, limits)).admitted

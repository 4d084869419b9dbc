"""Token throttling: exact windows, in-process and in a real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis
from mlmesh_metering.throttle import Limits, LocalThrottle, RedisThrottle, Throttle


@pytest.fixture
async def redis_client(redis_server):
    """redis-py on the test server: the tests' own view of what the throttle stored."""
    client = redis.Redis.from_url(redis_server[0])
    yield client
    await client.aclose()


@pytest.fixture(params=["local", "redis"])
async def throttle(request, redis_server, redis_client):
    url, _stop, _start = redis_server
    if request.param == "local":
        yield Throttle()
    else:
        shared = Throttle(url, redis_timeout_s=5.0)
        try:
            await redis_client.flushall()
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


async def test_unary_calls_count_requests_but_are_not_streams(throttle, redis_client):
    limits = Limits(requests_per_minute=3, max_concurrent_streams=1, tokens_per_minute=10)
    assert (await throttle.admit("key:u", "stream", 10, limits)).admitted
    # A stream holds the one slot and every token; unary calls still pass,
    # reserve nothing and are never settled.
    assert (await throttle.admit("key:u", "u1", 0, limits, stream=False)).admitted
    assert (await throttle.admit("key:u", "u2", 0, limits, stream=False)).admitted
    over = await throttle.admit("key:u", "u3", 0, limits, stream=False)
    assert not over.admitted and over.violated == "requests_per_minute"
    assert await throttle.local.used("key:u") == 10
    if throttle.redis is not None:
        assert await throttle.redis.used("key:u") == 10
        streams = await redis_client.zrange(RedisThrottle._keys("key:u")[3], 0, -1)
        assert streams == [b"stream"]


async def test_the_fallback_starts_from_what_this_replica_admitted_through_redis(
    redis_server, redis_client
):
    url, stop, start = redis_server
    throttle = Throttle(url, replicas=2, redis_timeout_s=5.0)
    await redis_client.flushall()
    limits = Limits(tokens_per_minute=1000)
    try:
        for i in range(4):  # 400 tokens through Redis: 100 under this replica's share
            assert (await throttle.admit("key:f", f"r{i}", 100, limits)).backend == "redis"
        await throttle.settle("key:f", "r0", 50)  # settles reach the copy too
        stop()
        decisions = [await throttle.admit("key:f", f"o{i}", 100, limits) for i in range(4)]
        assert {d.backend for d in decisions} == {"local"}
        # 350 of this replica's 500 were used before Redis went away.
        assert sum(d.admitted for d in decisions) == 1
    finally:
        start()
        await throttle.close()


async def test_replicas_share_one_budget_through_redis(redis_server, redis_client):
    url, _stop, _start = redis_server
    # A generous timeout: this test is about sharing one budget, not about a
    # slow Redis on a loaded CI machine (the fallback test covers that).
    replicas = [Throttle(url, replicas=3, redis_timeout_s=5.0) for _ in range(3)]
    try:
        await redis_client.flushall()
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
    monkeypatch.setattr("mlmesh_metering.throttle.time.monotonic", lambda: clock[0])
    local = LocalThrottle()
    limits = Limits(tokens_per_minute=100)
    assert (await local.admit("k", "a", 100, limits)).admitted
    clock[0] += 30
    denied = await local.admit("k", "b", 50, limits)
    assert not denied.admitted and denied.retry_after_s == pytest.approx(30)
    clock[0] += 30.01
    assert (await local.admit("k", "b", 50, limits)).admitted


@pytest.fixture(params=["local", "redis"])
async def backend(request, redis_server, redis_client):
    """A factory of one backend (LocalThrottle or RedisThrottle) with a given window."""
    url, _stop, _start = redis_server
    made: list[RedisThrottle] = []

    async def make(window_s: float = 60.0) -> LocalThrottle | RedisThrottle:
        if request.param == "local":
            return LocalThrottle(window_s=window_s)
        shared = RedisThrottle(url, timeout_s=5.0, window_s=window_s)
        made.append(shared)
        if len(made) == 1:
            await redis_client.flushall()
        return shared

    yield make
    for shared in made:
        await shared.close()


async def _stored(r: redis.Redis, subject: str) -> tuple[int, int]:
    """(running total as stored, sum of the reservations' hash) in Redis."""
    _, th, _, _, tt = RedisThrottle._keys(subject)
    total = await r.get(tt)
    return int(total) if total is not None else -1, sum(int(v) for v in await r.hvals(th))


async def test_running_total_is_the_exact_sum_after_reservations_and_settles(backend, redis_client):
    throttle = await backend()
    limits = Limits(tokens_per_minute=10**9)
    expected: dict[str, int] = {}
    for i in range(600):
        reserved = 100 + (i * 37) % 900
        assert (await throttle.admit("key:sum", f"r{i}", reserved, limits)).admitted
        expected[f"r{i}"] = reserved
    for i in range(0, 600, 2):  # half end with fewer tokens than they reserved
        actual = (i * 13) % 100
        await throttle.settle("key:sum", f"r{i}", actual)
        expected[f"r{i}"] = actual
    for i in range(1, 600, 6):  # more than reserved, or unknown ids: no change
        await throttle.settle("key:sum", f"r{i}", 10**6)
    await throttle.settle("key:sum", "never-admitted", 5)
    await throttle.settle("key:sum", "r0", 0)  # settled twice: the second never raises it
    expected["r0"] = 0
    # An id admitted again replaces its reservation.
    assert (await throttle.admit("key:sum", "r3", 7, limits)).admitted
    expected["r3"] = 7
    assert await throttle.used("key:sum") == sum(expected.values())
    if isinstance(throttle, RedisThrottle):
        assert await _stored(redis_client, "key:sum") == (sum(expected.values()),) * 2


def _fake_clock(monkeypatch) -> list[float]:
    """One clock for both backends (in-process: monotonic; Redis: the
    client's time.time, sent with each decision)."""
    clock = [5000.0]
    monkeypatch.setattr("mlmesh_metering.throttle.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("mlmesh_metering.throttle.time.time", lambda: clock[0])
    return clock


async def test_expiry_subtracts_the_expired_reservations(backend, monkeypatch, redis_client):
    clock = _fake_clock(monkeypatch)
    throttle = await backend(window_s=0.5)
    limits = Limits(tokens_per_minute=1000)
    assert (await throttle.admit("key:exp", "a", 400, limits)).admitted
    assert (await throttle.admit("key:exp", "b", 500, limits)).admitted
    await throttle.settle("key:exp", "b", 100)  # b keeps 100 of its 500
    assert await throttle.used("key:exp") == 500
    clock[0] += 0.3
    assert (await throttle.admit("key:exp", "c", 450, limits)).admitted
    denied = await throttle.admit("key:exp", "d", 100, limits)  # 950 + 100
    assert not denied.admitted and denied.retry_after_s == pytest.approx(0.2, abs=0.002)
    clock[0] += 0.3  # a and b have left the window, c has not
    assert (await throttle.admit("key:exp", "d", 550, limits)).admitted
    assert await throttle.used("key:exp") == 1000
    if isinstance(throttle, RedisThrottle):
        assert await _stored(redis_client, "key:exp") == (1000, 1000)
    clock[0] += 0.6  # all gone: the next decision starts from nothing
    assert (await throttle.admit("key:exp", "e", 1000, limits)).admitted
    assert await throttle.used("key:exp") == 1000
    if isinstance(throttle, RedisThrottle):
        assert await _stored(redis_client, "key:exp") == (1000, 1000)


async def test_rejection_waits_for_the_oldest_reservations(backend, monkeypatch):
    """The retry time walks reservations oldest first, past Redis's first page."""
    clock = _fake_clock(monkeypatch)
    throttle = await backend()
    limits = Limits(tokens_per_minute=10_000)
    for i in range(100):  # 100 x 100 tokens, one every 100 ms
        assert (await throttle.admit("key:walk", f"r{i:03}", 100, limits)).admitted
        clock[0] += 0.1
    # 5000 more needs the oldest 50 gone: r049 leaves at 4.9 s + 60 s.
    denied = await throttle.admit("key:walk", "big", 5000, limits)
    assert not denied.admitted and denied.violated == "tokens_per_minute"
    assert denied.retry_after_s == pytest.approx(4.9 + 60 - 10.0, abs=0.002)
    clock[0] += 54.9
    assert (await throttle.admit("key:walk", "big", 5000, limits)).admitted


async def test_redis_total_heals_when_missing_or_drifted(redis_server, redis_client):
    url, _stop, _start = redis_server
    throttle = RedisThrottle(url, timeout_s=5.0)
    try:
        await redis_client.flushall()
        await _heals(throttle, redis_client)
    finally:
        await throttle.close()


async def _heals(throttle: RedisThrottle, r: redis.Redis) -> None:
    limits = Limits(tokens_per_minute=1000)
    keys = RedisThrottle._keys("key:heal")
    tt = keys[-1]
    assert len({key.split("}")[0] for key in keys}) == 1  # one hash tag: one cluster slot
    for i in range(5):
        assert (await throttle.admit("key:heal", f"r{i}", 100, limits)).admitted
    assert all([await r.pttl(key) > 0 for key in keys])

    await r.delete(tt)  # the total expired or was evicted, the hash was not
    await throttle.settle("key:heal", "r0", 40)  # settling does not make a total up
    assert await r.exists(tt) == 0
    assert await throttle.used("key:heal") == 440  # read from the hash meanwhile
    assert not (await throttle.admit("key:heal", "x", 600, limits)).admitted
    assert await _stored(r, "key:heal") == (440, 440)  # recounted once
    assert await r.pttl(tt) > 0

    await r.set(tt, -7)  # drifted below zero
    assert (await throttle.admit("key:heal", "r5", 60, limits)).admitted
    assert await _stored(r, "key:heal") == (500, 500)

    await r.delete(keys[0], keys[1])  # the reservations are gone, a total is not
    await r.set(tt, 999)
    assert (await throttle.admit("key:heal", "r6", 1000, limits)).admitted
    assert await _stored(r, "key:heal") == (1000, 1000)
    assert await throttle.used("key:heal") == 1000


async def test_a_settle_not_waited_for_is_seen_by_the_replicas_next_calls(
    redis_server, redis_client
):
    """wait=False (what Metering uses): the settle is written before the
    call returns, and this replica's later reads and decisions see it."""
    url, _stop, _start = redis_server
    throttle = Throttle(url, redis_timeout_s=5.0)
    try:
        await redis_client.flushall()
        limits = Limits(tokens_per_minute=1000)
        assert (await throttle.admit("key:w", "a", 900, limits)).admitted
        await throttle.settle("key:w", "a", 100, wait=False)
        assert await throttle.redis.used("key:w") == 100
        assert (await throttle.admit("key:w", "b", 900, limits)).admitted
    finally:
        await throttle.close()

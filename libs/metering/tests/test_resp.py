"""The throttle's lean Redis client, against a real redis-server (and, for
the faults a real one won't show on demand, a socket that never answers)."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import redis.asyncio as redis
from mlmesh_metering.resp import RespClient, RespError, Script


@pytest.fixture
async def client(redis_server):
    url, _stop, _start = redis_server
    made = RespClient(url, timeout_s=5.0)
    await made.execute("FLUSHALL")
    yield made
    await made.close()


async def test_commands_and_replies(client):
    assert await client.execute("SET", "k", "v") == b"OK"
    assert await client.execute("GET", "k") == b"v"
    assert await client.execute("INCRBY", "n", 5) == 5
    assert await client.execute("GET", "missing") is None
    assert await client.execute("HSET", "h", "a", 1, "b", 2) == 2
    assert sorted(await client.execute("HVALS", "h")) == [b"1", b"2"]


async def test_an_error_reply_raises_with_redis_message(client):
    await client.execute("SET", "k", "not a number")
    with pytest.raises(RespError, match="not an integer"):
        await client.execute("INCRBY", "k", 1)
    # The connection is still in step: the next reply is the next call's.
    assert await client.execute("GET", "k") == b"not a number"


async def test_concurrent_calls_get_their_own_replies(client):
    """One pipelined connection: 500 calls in flight, each reply matched to its call."""
    replies = await asyncio.gather(*(client.execute("INCRBY", f"c{i % 7}", i) for i in range(500)))
    totals: dict[int, int] = {}
    for i, reply in enumerate(replies):
        totals[i % 7] = totals.get(i % 7, 0) + i
        assert reply == totals[i % 7]


async def test_a_script_is_loaded_when_redis_lacks_it(client):
    script = Script("return {tonumber(ARGV[1]) + 1, KEYS[1]}")
    assert await client.evalsha(script, ["key"], [41]) == [42, b"key"]
    await client.execute("SCRIPT", "FLUSH")  # as after a Redis restart
    assert await client.evalsha(script, ["key"], [1]) == [2, b"key"]


async def test_a_script_error_is_not_retried_as_noscript(client):
    script = Script("return redis.call('INCRBY', KEYS[1], 'x')")
    with pytest.raises(RespError, match="not an integer"):
        await client.evalsha(script, ["k"], [])


async def test_the_database_in_the_url_is_selected(redis_server, tmp_path):
    url, _stop, _start = redis_server
    database_url = f"{url}?db=13" if url.startswith("unix:") else url.rsplit("/", 1)[0] + "/13"
    fast = RespClient(database_url, timeout_s=5.0)
    other = redis.Redis.from_url(database_url)
    try:
        await fast.execute("SET", "selected", "yes")
        assert await other.get("selected") == b"yes"
        default = redis.Redis.from_url(url)
        try:
            assert await default.get("selected") is None
        finally:
            await default.aclose()
        await fast.execute("DEL", "selected")
    finally:
        await fast.close()
        await other.aclose()


async def test_a_wrong_password_fails_the_connect(redis_server):
    url, _stop, _start = redis_server
    bad = url + ("&" if "?" in url else "?") + "password=wrong"
    if not url.startswith("unix:"):
        bad = url.replace("redis://", "redis://:wrong@")
    fast = RespClient(bad, timeout_s=5.0)
    with pytest.raises(RespError, match=r"AUTH|password"):
        await fast.execute("PING")
    await fast.close()


@pytest.fixture
async def silent():
    """A server that accepts and never answers (a Redis hung, a path that
    drops packets): yields (port, the connections it accepted)."""
    connections: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read()  # until the client goes

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], connections
    server.close()
    for writer in connections:
        writer.close()
    await server.wait_closed()


async def test_a_call_that_times_out_closes_the_connection_and_the_next_reconnects(silent):
    """The call fails within its bound, and so does every call in flight
    with it; nothing hangs."""
    port, connections = silent
    fast = RespClient(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
    try:
        started = asyncio.get_running_loop().time()
        first, second = await asyncio.gather(
            fast.execute("PING"), fast.execute("PING"), return_exceptions=True
        )
        elapsed = asyncio.get_running_loop().time() - started
        assert elapsed < 1.0
        failures = {type(first), type(second)}
        assert failures <= {TimeoutError, ConnectionError}
        assert TimeoutError in failures
        with pytest.raises(TimeoutError):
            await fast.execute("PING")
        assert len(connections) == 2  # the timed-out connection was not reused
    finally:
        await fast.close()


async def test_redis_going_away_fails_the_call_and_the_client_reconnects(redis_server):
    url, stop, start = redis_server
    fast = RespClient(url, timeout_s=2.0)
    try:
        assert await fast.execute("PING") == b"PONG"
        stop()
        with pytest.raises((ConnectionError, OSError)):
            await fast.execute("PING")
        start()
        assert await fast.execute("PING") == b"PONG"
    finally:
        await fast.close()


async def test_calls_queued_behind_a_hanging_connect_fail_with_it(silent):
    """A connect that hangs in AUTH: every call waiting for the connection
    fails within one bound, not one bound after another."""
    port, _connections = silent
    fast = RespClient(f"redis://:secret@127.0.0.1:{port}/0", timeout_s=0.2)
    try:
        started = asyncio.get_running_loop().time()
        failures = await asyncio.gather(
            *(fast.execute("PING") for _ in range(8)), return_exceptions=True
        )
        assert asyncio.get_running_loop().time() - started < 0.6
        assert all(isinstance(f, TimeoutError) for f in failures)
    finally:
        await fast.close()


def test_url_options():
    assert RespClient("redis://h:6379/1").db == 1
    assert RespClient("redis://h:6379/1?db=3").db == 3  # the query wins, as in redis-py
    assert RespClient("unix:///tmp/r.sock?db=4&password=p%20w").password == "p w"
    plain = RespClient("redis://user:p%40ss@h:7000")
    assert (plain.username, plain.password, plain.port, plain.ssl) == ("user", "p@ss", 7000, None)
    secure = RespClient("rediss://h:6380/0")
    assert secure.ssl is not None and secure.ssl.verify_mode is ssl.CERT_REQUIRED
    assert secure.ssl.check_hostname
    lax = RespClient("rediss://h:6380/0?ssl_cert_reqs=none")
    assert lax.ssl is not None and lax.ssl.verify_mode is ssl.CERT_NONE
    assert not lax.ssl.check_hostname


@pytest.mark.parametrize(
    "url",
    [
        "http://host:6379",
        "redis://host:6379/zero",
        "unix:///tmp/r.sock?db=x",
        "rediss://host?ssl_cert_reqs=maybe",
        "rediss://host?ssl_check_hostname=perhaps",
    ],
)
def test_bad_urls_are_refused(url):
    with pytest.raises(ValueError):
        RespClient(url)


async def test_a_posted_call_runs_before_the_calls_after_it(client):
    """post_evalsha writes at once; later calls on the client run after it."""
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert not RespClient("redis://127.0.0.1:1/0").post_evalsha(script, ["k"], [1])  # no connection
    await client.execute("PING")
    assert not client.post_evalsha(script, ["posted"], [1])  # not run on this connection yet
    assert await client.evalsha(script, ["posted"], [0]) == 0
    for _ in range(100):
        assert client.post_evalsha(script, ["posted"], [1])
    assert await client.execute("GET", "posted") == b"100"


async def test_a_posted_call_is_rerun_when_redis_lacks_the_script(client):
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1]) -- posted")
    assert await client.evalsha(script, ["loaded"], [0]) == 0
    await client.execute("SCRIPT", "FLUSH")  # by hand, while connected
    assert client.post_evalsha(script, ["loaded"], [5])
    url = f"unix://{client.socket}?db={client.db}" if client.socket else None
    await client.close()  # waits for the replies due, the re-run included
    with pytest.raises(ConnectionError):
        await client.execute("PING")  # closed
    again = RespClient(url or f"redis://{client.host}:{client.port}/{client.db}", timeout_s=5.0)
    try:
        assert await again.execute("GET", "loaded") == b"5"
    finally:
        await again.close()

"""Throttling by tokens, requests and concurrent streams, exact for streams.

On admission a request reserves prompt tokens + max_tokens; while it streams,
the gateway counts tokens; at the end (or on cancel or error) it settles to
the actual count, returning the rest. Limits are sliding 60-second windows
over reservations: a request is admitted only if everything reserved in the
last minute plus its own reservation fits, so the tokens admitted in any
minute never exceed the limit. Rejections say exactly when enough budget
returns (the oldest reservations leaving the window).

Two backends with one behaviour: in-process (one gateway), and Redis (one
Lua script, one round trip per decision, shared by every gateway replica).
Redis unreachable: the stated policy is to fall back to in-process limits
divided by the number of replicas, and to try Redis again after a second;
never to fail open and never to hang (socket timeouts are short: 0.5 s by
default).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mlmesh.gateway.throttle")
WINDOW_S = 60.0


@dataclass(frozen=True)
class Limits:
    tokens_per_minute: int = 0  # 0: no limit
    requests_per_minute: int = 0
    max_concurrent_streams: int = 0

    def scaled(self, replicas: int) -> Limits:
        def share(value: int) -> int:
            return max(1, value // replicas) if value else 0

        return Limits(
            share(self.tokens_per_minute),
            share(self.requests_per_minute),
            share(self.max_concurrent_streams),
        )


@dataclass(frozen=True)
class Decision:
    admitted: bool
    retry_after_s: float = 0.0
    violated: str = ""  # "tokens_per_minute" | "requests_per_minute" | "concurrent_streams"
    backend: str = ""


class LocalThrottle:
    """In-process windows, for one gateway (and as the fallback)."""

    name = "local"

    def __init__(self) -> None:
        self._tokens: dict[str, collections.OrderedDict[str, tuple[float, int]]] = {}
        # Running sum of each subject's window, so a decision is O(1), not O(window).
        self._totals: dict[str, int] = collections.defaultdict(int)
        self._requests: dict[str, collections.deque[float]] = {}
        self._streams: dict[str, set[str]] = {}

    def _expire(self, subject: str, now: float) -> collections.OrderedDict[str, tuple[float, int]]:
        window = self._tokens.setdefault(subject, collections.OrderedDict())
        while window and next(iter(window.values()))[0] <= now - WINDOW_S:
            _, (_, amount) = window.popitem(last=False)
            self._totals[subject] -= amount
        requests = self._requests.setdefault(subject, collections.deque())
        while requests and requests[0] <= now - WINDOW_S:
            requests.popleft()
        return window

    async def admit(self, subject: str, request_id: str, tokens: int, limits: Limits) -> Decision:
        now = time.monotonic()
        window = self._expire(subject, now)
        streams = self._streams.setdefault(subject, set())
        if limits.max_concurrent_streams and len(streams) >= limits.max_concurrent_streams:
            return Decision(False, 1.0, "concurrent_streams", self.name)
        requests = self._requests[subject]
        if limits.requests_per_minute and len(requests) + 1 > limits.requests_per_minute:
            return Decision(False, requests[0] + WINDOW_S - now, "requests_per_minute", self.name)
        if limits.tokens_per_minute:
            used = self._totals[subject]
            if used + tokens > limits.tokens_per_minute:
                if tokens > limits.tokens_per_minute:
                    return Decision(False, WINDOW_S, "tokens_per_minute", self.name)
                freed, retry = 0, WINDOW_S
                for stamp, amount in window.values():
                    freed += amount
                    if used - freed + tokens <= limits.tokens_per_minute:
                        retry = stamp + WINDOW_S - now
                        break
                return Decision(False, max(retry, 0.01), "tokens_per_minute", self.name)
        window[request_id] = (now, tokens)
        self._totals[subject] += tokens
        requests.append(now)
        streams.add(request_id)
        return Decision(True, backend=self.name)

    async def settle(self, subject: str, request_id: str, actual: int) -> None:
        """Sets the request's tokens to what it used, and ends its stream."""
        window = self._tokens.get(subject)
        if window is not None and request_id in window:
            stamp, reserved = window[request_id]
            kept = min(reserved, actual)
            window[request_id] = (stamp, kept)
            self._totals[subject] -= reserved - kept
        self._streams.get(subject, set()).discard(request_id)

    async def used(self, subject: str) -> int:
        self._expire(subject, time.monotonic())
        return self._totals[subject]


# One round trip: expire, check streams / requests / tokens, reserve.
_ADMIT = """
local tz, th, rz, sz = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local id, tokens = ARGV[3], tonumber(ARGV[4])
local tpm, rpm = tonumber(ARGV[5]), tonumber(ARGV[6])
local streams, lease = tonumber(ARGV[7]), tonumber(ARGV[8])
local old = redis.call('ZRANGEBYSCORE', tz, '-inf', now - window)
if #old > 0 then
  redis.call('HDEL', th, unpack(old))
  redis.call('ZREMRANGEBYSCORE', tz, '-inf', now - window)
end
redis.call('ZREMRANGEBYSCORE', rz, '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', sz, '-inf', now)
if streams > 0 and redis.call('ZCARD', sz) >= streams then
  return {0, 1000, 'concurrent_streams'}
end
if rpm > 0 and redis.call('ZCARD', rz) + 1 > rpm then
  local first = redis.call('ZRANGE', rz, 0, 0, 'WITHSCORES')
  return {0, math.max(tonumber(first[2]) + window - now, 10), 'requests_per_minute'}
end
if tpm > 0 then
  if tokens > tpm then return {0, window, 'tokens_per_minute'} end
  local used = 0
  for _, v in ipairs(redis.call('HVALS', th)) do used = used + tonumber(v) end
  if used + tokens > tpm then
    local freed, retry = 0, window
    local entries = redis.call('ZRANGE', tz, 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      freed = freed + tonumber(redis.call('HGET', th, entries[i]) or '0')
      if used - freed + tokens <= tpm then
        retry = tonumber(entries[i + 1]) + window - now
        break
      end
    end
    return {0, math.max(retry, 10), 'tokens_per_minute'}
  end
end
redis.call('ZADD', tz, now, id)
redis.call('HSET', th, id, tokens)
redis.call('ZADD', rz, now, id)
redis.call('ZADD', sz, now + lease, id)
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, window * 2 + lease) end
return {1, 0, ''}
"""
_SETTLE = """
local reserved = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if reserved >= 0 and tonumber(ARGV[2]) < reserved then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


class RedisThrottle:
    """The same windows in Redis, shared by every gateway replica."""

    name = "redis"

    def __init__(self, url: str, timeout_s: float = 0.5, stream_lease_s: float = 600.0) -> None:
        import redis.asyncio as redis

        # A pool that waits for a free connection (up to the timeout) rather
        # than failing at once, which would read as an outage under load.
        self._pool = pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=256,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self.stream_lease_ms = int(stream_lease_s * 1000)

    @staticmethod
    def _keys(subject: str) -> list[str]:
        return [f"mlmesh:throttle:{{{subject}}}:{part}" for part in ("tz", "th", "rz", "sz")]

    async def admit(self, subject: str, request_id: str, tokens: int, limits: Limits) -> Decision:
        now_ms = int(time.time() * 1000)
        admitted, retry_ms, violated = await self._admit(
            keys=self._keys(subject),
            args=[
                now_ms,
                int(WINDOW_S * 1000),
                request_id,
                tokens,
                limits.tokens_per_minute,
                limits.requests_per_minute,
                limits.max_concurrent_streams,
                self.stream_lease_ms,
            ],
        )
        violated = violated.decode() if isinstance(violated, bytes) else str(violated)
        return Decision(bool(admitted), int(retry_ms) / 1000, violated, self.name)

    async def settle(self, subject: str, request_id: str, actual: int) -> None:
        _, th, _, sz = self._keys(subject)
        await self._settle(keys=[th, sz], args=[request_id, actual])

    async def used(self, subject: str) -> int:
        values = await self._redis.hvals(self._keys(subject)[1])
        return sum(int(v) for v in values)

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.disconnect()


class Throttle:
    """Redis when configured and reachable; otherwise in-process limits
    divided by the replica count (the stated outage policy)."""

    def __init__(
        self,
        redis_url: str = "",
        replicas: int = 1,
        retry_redis_s: float = 1.0,
        redis_timeout_s: float = 0.5,
    ) -> None:
        self.local = LocalThrottle()
        self.redis = RedisThrottle(redis_url, redis_timeout_s) if redis_url else None
        self.replicas = max(1, replicas)
        self.retry_redis_s = retry_redis_s
        self._redis_down_until = 0.0
        self._where: dict[str, Any] = {}  # request id -> backend that admitted it

    async def admit(self, subject: str, request_id: str, tokens: int, limits: Limits) -> Decision:
        if self.redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                decision = await self.redis.admit(subject, request_id, tokens, limits)
                if decision.admitted:
                    self._where[request_id] = self.redis
                return decision
            except Exception as error:  # connection refused, timeout: the policy below
                self._redis_down_until = time.monotonic() + self.retry_redis_s
                log.warning(
                    "Redis unreachable (%s); local limits / %d replicas", error, self.replicas
                )
        scaled = limits.scaled(self.replicas) if self.redis is not None else limits
        decision = await self.local.admit(subject, request_id, tokens, scaled)
        if decision.admitted:
            self._where[request_id] = self.local
        return decision

    async def settle(self, subject: str, request_id: str, actual: int) -> None:
        backend = self._where.pop(request_id, None)
        if backend is None:
            return
        try:
            await asyncio.wait_for(backend.settle(subject, request_id, actual), 1.0)
        except Exception as error:  # the reservation expires with its window
            log.warning("could not settle %s: %s", request_id, error)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()

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
default). Each replica also keeps, in process, what it admitted through
Redis in the last minute, so its fallback window starts from its own recent
usage rather than from zero: with the replicas' shares even, the three
together stay within the limit across the switch. (A Redis that comes back
empty has forgotten the minute before: that minute can admit up to twice
the limit.)

Every reservation is keyed by a call id the server makes at admission (see
``mlmesh_metering.Metering.admit``), under a subject of the verified key: a
value the caller chooses (its request id) never names a reservation, so
reusing one can neither replace a reservation nor touch another key's.

Unary calls (Infer, Embed) are not streams: they count against requests per
minute only, reserve no tokens and need no settle, so a decision for them is
one round trip and nothing after.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mlmesh.metering.throttle")
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

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._tokens: dict[str, collections.OrderedDict[str, tuple[float, int]]] = {}
        # Running sum of each subject's window, so a decision is O(1), not O(window).
        self._totals: dict[str, int] = collections.defaultdict(int)
        self._requests: dict[str, collections.deque[float]] = {}
        self._streams: dict[str, set[str]] = {}

    def _expire(self, subject: str, now: float) -> collections.OrderedDict[str, tuple[float, int]]:
        window = self._tokens.setdefault(subject, collections.OrderedDict())
        while window and next(iter(window.values()))[0] <= now - self.window_s:
            _, (_, amount) = window.popitem(last=False)
            self._totals[subject] -= amount
        requests = self._requests.setdefault(subject, collections.deque())
        while requests and requests[0] <= now - self.window_s:
            requests.popleft()
        return window

    async def admit(
        self, subject: str, call_id: str, tokens: int, limits: Limits, stream: bool = True
    ) -> Decision:
        now = time.monotonic()
        window = self._expire(subject, now)
        streams = self._streams.setdefault(subject, set())
        if (
            stream
            and limits.max_concurrent_streams
            and len(streams) >= limits.max_concurrent_streams
        ):
            return Decision(False, 1.0, "concurrent_streams", self.name)
        requests = self._requests[subject]
        if limits.requests_per_minute and len(requests) + 1 > limits.requests_per_minute:
            retry = requests[0] + self.window_s - now
            return Decision(False, retry, "requests_per_minute", self.name)
        if limits.tokens_per_minute:
            used = self._totals[subject]
            if used + tokens > limits.tokens_per_minute:
                if tokens > limits.tokens_per_minute:
                    return Decision(False, self.window_s, "tokens_per_minute", self.name)
                freed, retry = 0, self.window_s
                for stamp, amount in window.values():
                    freed += amount
                    if used - freed + tokens <= limits.tokens_per_minute:
                        retry = stamp + self.window_s - now
                        break
                return Decision(False, max(retry, 0.01), "tokens_per_minute", self.name)
        self._reserve(subject, window, call_id, tokens, now, stream)
        return Decision(True, backend=self.name)

    def record(self, subject: str, call_id: str, tokens: int, stream: bool = True) -> None:
        """Counts a request another backend admitted (Redis), unchecked."""
        now = time.monotonic()
        self._reserve(subject, self._expire(subject, now), call_id, tokens, now, stream)

    def _reserve(
        self,
        subject: str,
        window: collections.OrderedDict[str, tuple[float, int]],
        call_id: str,
        tokens: int,
        now: float,
        stream: bool,
    ) -> None:
        # Call ids are unique (server-made); should one come again it replaces
        # its reservation (as in Redis), so the total stays the window's sum.
        previous = window.pop(call_id, None)
        if previous is not None:
            self._totals[subject] -= previous[1]
        if tokens:
            window[call_id] = (now, tokens)
            self._totals[subject] += tokens
        self._requests[subject].append(now)
        if stream:
            self._streams.setdefault(subject, set()).add(call_id)

    async def settle(self, subject: str, call_id: str, actual: int) -> None:
        """Sets the request's tokens to what it used, and ends its stream."""
        window = self._tokens.get(subject)
        if window is not None and call_id in window:
            stamp, reserved = window[call_id]
            kept = min(reserved, actual)
            window[call_id] = (stamp, kept)
            self._totals[subject] -= reserved - kept
        self._streams.get(subject, set()).discard(call_id)

    async def used(self, subject: str) -> int:
        self._expire(subject, time.monotonic())
        return self._totals[subject]


# One round trip: expire, check streams / requests / tokens, reserve.
#
# The tokens in the window are kept as a running total (tt) beside the
# reservations (th: id -> tokens, tz: id by time), so a decision is O(1) plus
# what it expires, not O(reservations in the window): admit adds a
# reservation's tokens, expiry subtracts the expired ones', settle subtracts
# what a request returns. The total heals itself: where it is missing (expired
# or evicted apart from the hash, or written by an older gateway) or has gone
# negative, it is recounted once from the hash; an empty hash means 0. Only a
# rejection walks reservations (oldest first, a page at a time, stopping as
# soon as enough would have left the window) to say when to retry.
_ADMIT = """
local tz, th, rz, sz, tt = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local id, tokens = ARGV[3], tonumber(ARGV[4])
local tpm, rpm = tonumber(ARGV[5]), tonumber(ARGV[6])
local streams, lease = tonumber(ARGV[7]), tonumber(ARGV[8])
local stored = redis.call('GET', tt)
local total = stored and tonumber(stored) or -1
local old = redis.call('ZRANGEBYSCORE', tz, '-inf', now - window)
for first = 1, #old, 1000 do
  local ids = {unpack(old, first, math.min(first + 999, #old))}
  if total >= 0 then
    for _, v in ipairs(redis.call('HMGET', th, unpack(ids))) do
      total = total - tonumber(v or '0')
    end
  end
  redis.call('HDEL', th, unpack(ids))
end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', tz, '-inf', now - window) end
if redis.call('HLEN', th) == 0 then
  if stored then redis.call('DEL', tt) end
  total = 0
elseif total < 0 then
  total = 0
  for _, v in ipairs(redis.call('HVALS', th)) do total = total + tonumber(v) end
  redis.call('SET', tt, string.format('%d', total), 'PX', window * 2 + lease)
elseif total ~= tonumber(stored) then
  redis.call('DECRBY', tt, string.format('%d', tonumber(stored) - total))
end
redis.call('ZREMRANGEBYSCORE', rz, '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', sz, '-inf', now)
if streams > 0 and lease >= 0 and redis.call('ZCARD', sz) >= streams then
  return {0, 1000, 'concurrent_streams'}
end
if rpm > 0 and redis.call('ZCARD', rz) + 1 > rpm then
  local first = redis.call('ZRANGE', rz, 0, 0, 'WITHSCORES')
  return {0, math.max(tonumber(first[2]) + window - now, 10), 'requests_per_minute'}
end
if tpm > 0 then
  if tokens > tpm then return {0, window, 'tokens_per_minute'} end
  if total + tokens > tpm then
    local freed, retry, start, page, done = 0, window, 0, 32, false
    while not done do
      local entries = redis.call('ZRANGE', tz, start, start + page - 1, 'WITHSCORES')
      if #entries == 0 then break end
      local ids = {}
      for i = 1, #entries, 2 do ids[#ids + 1] = entries[i] end
      local amounts = redis.call('HMGET', th, unpack(ids))
      for j = 1, #ids do
        freed = freed + tonumber(amounts[j] or '0')
        if total - freed + tokens <= tpm then
          retry = tonumber(entries[j * 2]) + window - now
          done = true
          break
        end
      end
      start, page = start + page, math.min(page * 2, 1000)
    end
    return {0, math.max(retry, 10), 'tokens_per_minute'}
  end
end
if tokens > 0 then
  local previous = tonumber(redis.call('HGET', th, id) or '0')
  redis.call('ZADD', tz, now, id)
  redis.call('HSET', th, id, tokens)
  redis.call('INCRBY', tt, string.format('%d', tokens - previous))
end
redis.call('ZADD', rz, now, id)
if lease >= 0 then redis.call('ZADD', sz, now + lease, id) end
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, window * 2 + math.max(lease, 0)) end
return {1, 0, ''}
"""
_SETTLE = """
local th, sz, tt = KEYS[1], KEYS[2], KEYS[3]
local reserved = tonumber(redis.call('HGET', th, ARGV[1]) or '-1')
local actual = tonumber(ARGV[2])
if reserved >= 0 and actual < reserved then
  redis.call('HSET', th, ARGV[1], ARGV[2])
  if redis.call('EXISTS', tt) == 1 then
    redis.call('DECRBY', tt, string.format('%d', reserved - actual))
  end
end
redis.call('ZREM', sz, ARGV[1])
return 1
"""


class RedisThrottle:
    """The same windows in Redis, shared by every gateway replica."""

    name = "redis"

    def __init__(
        self,
        url: str,
        timeout_s: float = 0.5,
        stream_lease_s: float = 600.0,
        window_s: float = WINDOW_S,
    ) -> None:
        # (Imported here: a service without Redis limits, such as the llm in
        # vLLM's environment, needs no hiredis.)
        from mlmesh_metering.resp import RespClient, Script

        # One pipelined connection (resp.py) for every call of every request.
        self._client = RespClient(url, timeout_s)
        self._admit = Script(_ADMIT)
        self._settle = Script(_SETTLE)
        self.stream_lease_ms = int(stream_lease_s * 1000)
        self.window_ms = int(window_s * 1000)

    @staticmethod
    def _keys(subject: str) -> list[str]:
        # One hash tag per subject: every key of a decision is in one Redis
        # Cluster slot. tt: the running total of the tokens in th.
        return [f"mlmesh:throttle:{{{subject}}}:{part}" for part in ("tz", "th", "rz", "sz", "tt")]

    async def admit(
        self, subject: str, call_id: str, tokens: int, limits: Limits, stream: bool = True
    ) -> Decision:
        now_ms = int(time.time() * 1000)
        admitted, retry_ms, violated = await self._client.evalsha(
            self._admit,
            self._keys(subject),
            [
                now_ms,
                self.window_ms,
                call_id,
                tokens,
                limits.tokens_per_minute,
                limits.requests_per_minute,
                limits.max_concurrent_streams,
                self.stream_lease_ms if stream else -1,  # -1: not a stream
            ],
        )
        violated = violated.decode() if isinstance(violated, bytes) else str(violated)
        return Decision(bool(admitted), int(retry_ms) / 1000, violated, self.name)

    async def settle(self, subject: str, call_id: str, actual: int) -> None:
        _, th, _, sz, tt = self._keys(subject)
        await self._client.evalsha(self._settle, [th, sz, tt], [call_id, actual])

    def post_settle(self, subject: str, call_id: str, actual: int) -> bool:
        """The settle written to Redis now, its reply checked later (a
        request's answer need not wait for it): this replica's later calls
        run after it, as they share its connection. False: not written (no
        connection yet), ``settle`` must be awaited."""
        _, th, _, sz, tt = self._keys(subject)
        return self._client.post_evalsha(self._settle, [th, sz, tt], [call_id, actual])

    async def used(self, subject: str) -> int:
        """Tokens reserved in the window (as of the subject's last decision;
        read after this replica's settles, on the same connection)."""
        _, th, _, _, tt = self._keys(subject)
        total, present = await asyncio.gather(
            self._client.execute("GET", tt), self._client.execute("EXISTS", th)
        )
        if not present:
            return 0
        if total is None or int(total) < 0:  # not kept yet: the next decision recounts it
            return sum(int(v) for v in await self._client.execute("HVALS", th))
        return int(total)

    async def close(self) -> None:
        await self._client.close()


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
        self._where: dict[str, Any] = {}  # call id -> backend that admitted it

    async def admit(
        self, subject: str, call_id: str, tokens: int, limits: Limits, stream: bool = True
    ) -> Decision:
        """``stream``: a Generate stream, to be settled; False: a unary call
        (requests per minute only; no settle needed)."""
        if self.redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                decision = await self.redis.admit(subject, call_id, tokens, limits, stream)
                if decision.admitted:
                    # Kept in process too: the outage fallback starts from it.
                    self.local.record(subject, call_id, tokens, stream)
                    if stream:
                        self._where[call_id] = self.redis
                return decision
            except Exception as error:  # connection refused, timeout: the policy below
                self._redis_down_until = time.monotonic() + self.retry_redis_s
                log.warning(
                    "Redis unreachable (%s); local limits / %d replicas", error, self.replicas
                )
        scaled = limits.scaled(self.replicas) if self.redis is not None else limits
        decision = await self.local.admit(subject, call_id, tokens, scaled, stream)
        if decision.admitted and stream:
            self._where[call_id] = self.local
        return decision

    async def settle(self, subject: str, call_id: str, actual: int, wait: bool = True) -> None:
        """``wait=False``: Redis' reply is not waited for (RedisThrottle.post_settle)."""
        backend = self._where.pop(call_id, None)
        if backend is None:
            return
        await self.local.settle(subject, call_id, actual)  # (for Redis: the in-process copy)
        if backend is self.local:
            return
        if not wait and backend.post_settle(subject, call_id, actual):
            return
        try:
            # (asyncio.timeout, not wait_for: no extra task per call.)
            async with asyncio.timeout(1.0):
                await backend.settle(subject, call_id, actual)
        except Exception as error:  # the reservation expires with its window
            log.warning("could not settle %s: %s", call_id, error)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()

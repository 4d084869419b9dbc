"""Retry policy for idempotent client calls (tenacity).

Retries UNAVAILABLE (and DEADLINE_EXCEEDED on reads the caller marks safe)
with jittered exponential backoff, honouring a server's RetryInfo delay, and
never past the current call's deadline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from mlmesh_chassis.context import remaining_time
from mlmesh_chassis.errors import details_of

T = TypeVar("T")
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() in RETRYABLE  # type: ignore[attr-defined]


class _Wait:
    """Jittered backoff, or the server's RetryInfo delay when it sends one."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.backoff = wait_exponential_jitter(initial=initial, max=maximum)
        self.maximum = maximum

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, grpc.RpcError):
            info = details_of(exc).retry_info
            if info is not None and info.HasField("retry_delay"):
                return min(info.retry_delay.ToTimedelta().total_seconds(), self.maximum)
        return float(self.backoff(state))


async def call_idempotent(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int = 4,
    initial_backoff: float = 0.05,
    max_backoff: float = 2.0,
    budget_s: float = 10.0,
) -> T:
    """Runs ``fn`` (an idempotent call) with the retry policy."""
    left = remaining_time()
    if left is not None:
        budget_s = min(budget_s, left)
    retrying = AsyncRetrying(
        retry=retry_if_exception(_retryable),
        wait=_Wait(initial_backoff, max_backoff),
        stop=stop_after_attempt(attempts) | stop_after_delay(budget_s),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover

"""Per-call context (request id, deadline) carried in contextvars.

Set by the server interceptor, read by logging and by the client interceptors
(which forward the request id and shrink outgoing timeouts to the deadline).
"""

from __future__ import annotations

import contextvars
import time
import uuid

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# Absolute time.monotonic() deadline of the call being served, if it has one.
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "deadline", default=None
)
REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    return uuid.uuid4().hex


def remaining_time() -> float | None:
    """Seconds left until the current call's deadline (None: no deadline)."""
    deadline = deadline_var.get()
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)

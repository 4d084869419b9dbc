"""A usage event, and the check on the request id a caller may supply (the
other fields a caller sends to RecordUsage are the contract's rules, checked
by the chassis).

Identity: ``event_id`` (the ledger's key; insert-or-ignore on it makes a
retried write idempotent) and ``call_id`` are made by the server at
admission; ``request_id`` is the caller's own, kept for tracing only: it
never merges two events and never names a reservation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mlmesh_chassis.errors import FieldViolation, InvalidArgument

# The ledger's column size for request_id (ledger.usage_events) is this limit.
REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")  # printable ASCII
REQUEST_ID_RULE = "printable ASCII (0x20-0x7E), 1 to 128 characters"


def check_request_id(value: str, path: str = "request_id") -> None:
    """INVALID_ARGUMENT (BadRequest) unless ``value`` is empty or a valid
    request id (re.fullmatch: ``$`` would let a trailing newline through)."""
    if value and REQUEST_ID.fullmatch(value) is None:
        raise InvalidArgument(
            f"{path}: {REQUEST_ID_RULE}", [FieldViolation(path, REQUEST_ID_RULE)], field=path
        )


@dataclass(frozen=True)
class UsageEvent:
    """One call's usage. ``unit``/``quantity`` is what the serving service
    meters (tokens, rows, vectors, items); Generate also splits its tokens
    into prompt and completion."""

    key_id: str
    call_id: str
    service: int
    model: str = ""
    request_id: str = ""
    unit: str = "tokens"
    quantity: int = 0
    version: int = 0
    region: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_items: int = 0
    latency_ms: float = 0.0
    status: str = "OK"
    event_id: str = field(default="")  # empty: the call id (one event per call)

    def __post_init__(self) -> None:
        if not self.event_id:
            object.__setattr__(self, "event_id", self.call_id)

    @property
    def tokens(self) -> int:
        """What counts against a token quota."""
        return self.quantity if self.unit == "tokens" else 0

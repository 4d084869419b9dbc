"""A usage event, and the checks on every value a caller may supply.

Identity: ``event_id`` (the ledger's key; insert-or-ignore on it makes a
retried write idempotent) and ``call_id`` are made by the server at
admission; ``request_id`` is the caller's own, kept for tracing only: it
never merges two events and never names a reservation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mlmesh_chassis.errors import FieldViolation, InvalidArgument

# The ledger's column sizes (ledger.usage_events) are these limits.
REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")  # printable ASCII
REQUEST_ID_RULE = "printable ASCII (0x20-0x7E), 1 to 128 characters"
SERVER_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
SERVER_ID_RULE = "1 to 64 characters of A-Z a-z 0-9 _ . : -"
KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
KEY_ID_RULE = "1 to 32 characters of A-Z a-z 0-9 _ -"
MODEL = re.compile(r"[a-z][a-z0-9-]{1,62}")  # the registry's model names
MODEL_RULE = "a model name: a lowercase letter, then 1 to 62 of a-z 0-9 -"
REGION = re.compile(r"[A-Za-z0-9._-]{1,63}")
REGION_RULE = "1 to 63 characters of A-Z a-z 0-9 . _ -"
UNIT = re.compile(r"[a-z]{1,16}")
UNIT_RULE = "1 to 16 lowercase letters (tokens, rows, vectors, items)"
STATUS = re.compile(r"[A-Z_]{1,32}")
STATUS_RULE = '"OK" or a gRPC status code name'


def check(
    violations: list[FieldViolation],
    path: str,
    value: str,
    pattern: re.Pattern[str],
    rule: str,
    *,
    optional: bool = False,
) -> None:
    """Appends a violation unless ``value`` matches all of ``pattern``
    (re.fullmatch: ``$`` would let a trailing newline through)."""
    if optional and not value:
        return
    if pattern.fullmatch(value) is None:
        violations.append(FieldViolation(path, rule))


def check_request_id(value: str, path: str = "request_id") -> None:
    """INVALID_ARGUMENT (BadRequest) unless ``value`` is empty or a valid
    request id."""
    violations: list[FieldViolation] = []
    check(violations, path, value, REQUEST_ID, REQUEST_ID_RULE, optional=True)
    if violations:
        raise InvalidArgument(f"{path}: {REQUEST_ID_RULE}", violations, field=path)


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

    def violations(self, prefix: str = "") -> list[FieldViolation]:
        """Every value the ledger would refuse, as field violations."""
        found: list[FieldViolation] = []
        check(found, f"{prefix}event_id", self.event_id, SERVER_ID, SERVER_ID_RULE)
        check(found, f"{prefix}call_id", self.call_id, SERVER_ID, SERVER_ID_RULE)
        check(found, f"{prefix}key_id", self.key_id, KEY_ID, KEY_ID_RULE)
        check(
            found,
            f"{prefix}request_id",
            self.request_id,
            REQUEST_ID,
            REQUEST_ID_RULE,
            optional=True,
        )
        check(found, f"{prefix}model", self.model, MODEL, MODEL_RULE, optional=True)
        check(found, f"{prefix}unit", self.unit, UNIT, UNIT_RULE)
        check(found, f"{prefix}region", self.region, REGION, REGION_RULE, optional=True)
        check(found, f"{prefix}status", self.status, STATUS, STATUS_RULE)
        if self.quantity < 0:
            found.append(FieldViolation(f"{prefix}quantity", "must not be negative"))
        return found

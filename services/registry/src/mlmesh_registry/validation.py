"""Request validation: names, tags, checksums, free-text sizes and page tokens.

Patterns are whole-string matches (``fullmatch``): with ``match`` and ``$``, a
name with a trailing newline would pass (``$`` also matches before a final
``\n``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from mlmesh_chassis.errors import FieldViolation, InvalidArgument, shorten

# Used with fullmatch only (see the module docstring).
MODEL_NAME = re.compile(r"[a-z][a-z0-9-]{1,62}")
ALIAS_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
TAG_KEY = re.compile(r"[a-z0-9_.-]{1,63}")
SHA256 = re.compile(r"[0-9a-f]{64}")
# Experiment stickiness keys: sent as the header `x-mlmesh-<key>` with `_` as
# `-` (Envoy rejects underscores in headers), so a key must make a valid
# lowercase HTTP/2 (and gRPC metadata) header name; `-bin` would make it a
# binary header.
STICKINESS_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
STICKINESS_HEADER_PREFIX = "x-mlmesh-"
# Headers the mesh itself sets or reads: a caller could not choose their value.
RESERVED_STICKINESS_KEYS = frozenset({"actor", "key-id", "backend", "region", "request-id"})
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Free text: descriptions and reasons (characters).
MAX_DESCRIPTION_CHARS = 16 * 1024
MAX_REASON_CHARS = 1024
MAX_TAG_VALUE_CHARS = 255
# A version's lineage, serialized (an environment lock and a source snapshot
# are tens of KiB; this leaves room for large trees).
MAX_LINEAGE_BYTES = 1024 * 1024
# A list page stops before its serialized items exceed this (far below the
# 4 MiB default gRPC message limit); next_page_token continues.
MAX_PAGE_BYTES = 1024 * 1024


def check_name(field: str, value: str, pattern: re.Pattern[str] = MODEL_NAME) -> str:
    if not pattern.fullmatch(value):
        raise InvalidArgument(
            f"{field}: must match {pattern.pattern} (got {shorten(repr(value))})",
            [FieldViolation(field, f"must match {pattern.pattern}")],
            field=field,
            value=value,
        )
    return value


def check_text(field: str, value: str, limit: int) -> str:
    """Free text (a description, a reason) of at most ``limit`` characters."""
    if len(value) > limit:
        raise InvalidArgument(
            f"{field}: at most {limit} characters (got {len(value)})",
            [FieldViolation(field, f"at most {limit} characters")],
            field=field,
            limit=limit,
            length=len(value),
        )
    return value


def check_tags(field: str, tags: Mapping[str, str]) -> dict[str, str]:
    violations = [
        FieldViolation(f"{field}[{shorten(repr(key))}]", "tag keys must match [a-z0-9_.-]{1,63}")
        for key in tags
        if not TAG_KEY.fullmatch(key)
    ] + [
        FieldViolation(
            f"{field}[{shorten(repr(key))}]",
            f"tag values are at most {MAX_TAG_VALUE_CHARS} characters",
        )
        for key, value in tags.items()
        if len(value) > MAX_TAG_VALUE_CHARS
    ]
    if violations:
        raise InvalidArgument(f"{field}: invalid tags", violations, field=field)
    return dict(tags)


def check_stickiness_key(field: str, key: str) -> str:
    """A stickiness key the gateway can read from a request header."""
    if not STICKINESS_KEY.fullmatch(key) or key.endswith("-bin"):
        problem = (
            f"must match {STICKINESS_KEY.pattern} and not end in -bin: it is sent as the "
            f"lowercase header {STICKINESS_HEADER_PREFIX}<key>"
        )
    elif key in RESERVED_STICKINESS_KEYS:
        problem = f"{STICKINESS_HEADER_PREFIX}{key} is a header the mesh itself sets"
    else:
        return key
    raise InvalidArgument(
        f"{field}: {problem} (got {shorten(repr(key))})",
        [FieldViolation(field, problem)],
        field=field,
        value=key,
    )


def page_size(value: int, field: str = "page_size") -> int:
    if value < 0:
        raise InvalidArgument.field(field, "must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(query: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]


def encode_page_token(after: Any, query: Mapping[str, Any]) -> str:
    raw = json.dumps({"after": after, "q": _fingerprint(query)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, query: Mapping[str, Any]) -> Any:
    """Returns the key to continue after, or None for the first page."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded))
        after, fingerprint = body["after"], body["q"]
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidArgument.field("page_token", "is not a token this list returned") from error
    if fingerprint != _fingerprint(query):
        raise InvalidArgument.field("page_token", "belongs to a list with other filters")
    return after

"""Request validation: names, tags, checksums and page tokens."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from mlmesh_chassis.errors import FieldViolation, InvalidArgument

MODEL_NAME = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
ALIAS_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
TAG_KEY = re.compile(r"^[a-z0-9_.-]{1,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def check_name(field: str, value: str, pattern: re.Pattern[str] = MODEL_NAME) -> str:
    if not pattern.match(value):
        raise InvalidArgument.field(field, f"must match {pattern.pattern} (got {value!r})")
    return value


def check_tags(field: str, tags: Mapping[str, str]) -> dict[str, str]:
    violations = [
        FieldViolation(f"{field}[{key!r}]", "tag keys must match [a-z0-9_.-]{1,63}")
        for key in tags
        if not TAG_KEY.match(key)
    ] + [
        FieldViolation(f"{field}[{key!r}]", "tag values are at most 255 characters")
        for key, value in tags.items()
        if len(value) > 255
    ]
    if violations:
        raise InvalidArgument(f"{field}: invalid tags", violations, field=field)
    return dict(tags)


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

"""Pagination (AIP-158 fields): offset tokens for small in-memory lists
(loaded models, deployments), and key tokens for lists a database holds
(the registry's, the review queue's): the last key a page returned, bound
to the query's filters so a token cannot be replayed against others.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from mlmesh_chassis.errors import InvalidArgument

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def offset_page(items: Sequence[T], page_size: int, page_token: str) -> tuple[list[T], str]:
    """One page of ``items`` and the token for the next ("" at the end)."""
    if page_size < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    try:
        start = int(page_token or 0)
    except ValueError as error:
        raise InvalidArgument.field("page_token", "is not a token this list returned") from error
    if start < 0:
        raise InvalidArgument.field("page_token", "is not a token this list returned")
    end = start + size
    return list(items[start:end]), str(end) if end < len(items) else ""


def _fingerprint(query: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]


def encode_page_token(after: Any, query: Mapping[str, Any]) -> str:
    """The token for the page after key ``after`` of the list ``query`` names."""
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

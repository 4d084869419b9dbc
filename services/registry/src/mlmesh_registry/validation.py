"""What the registry checks itself: only what its contracts' buf.validate
rules cannot say. The chassis checks every request against those rules
(names, tags, lengths, ranges) before a handler runs; what is left here is
list paging (the page size's default and cap, page tokens, the page byte
limit) and the lineage size cap (a serialized size, which no rule can
measure). The update masks and the rules that need more than one field or
the database (an experiment's weights, the versions it routes to) are with
the store's aggregates.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mlmesh_chassis.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A version's lineage, serialized (an environment lock and a source snapshot
# are tens of KiB; this leaves room for large trees).
MAX_LINEAGE_BYTES = 1024 * 1024
# A list page stops before its serialized items exceed this (far below the
# 4 MiB default gRPC message limit); next_page_token continues.
MAX_PAGE_BYTES = 1024 * 1024


def page_size(value: int) -> int:
    """The size of a list page: the default where none is asked for (0), at
    most MAX_PAGE_SIZE. (The contract refuses a negative page_size.)"""
    return min(value, MAX_PAGE_SIZE) if value > 0 else DEFAULT_PAGE_SIZE


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

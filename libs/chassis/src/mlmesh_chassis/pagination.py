"""Pagination of small in-memory lists (AIP-158 fields, offset tokens).

For lists a service holds in memory (loaded models, deployments). Lists
backed by a database page by key instead (see the registry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

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

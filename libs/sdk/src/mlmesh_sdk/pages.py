"""Following a paginated list (AIP-158) to its end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any


async def every_item(
    fetch: Callable[[Any], Awaitable[Any]], request: Any, field: str
) -> AsyncIterator[Any]:
    """Every item of a list: ``fetch(request)`` once per page, the request
    carrying each page's token; ``field`` names the response's items."""
    while True:
        response = await fetch(request)
        for item in getattr(response, field):
            yield item
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token

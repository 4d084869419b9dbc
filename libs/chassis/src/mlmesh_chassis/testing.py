"""Test helpers: real servers on port 0, and status assertions."""

from __future__ import annotations

import grpc

from mlmesh_chassis.errors import ErrorDetails, details_of


async def expect_error(awaitable, code: grpc.StatusCode) -> ErrorDetails:  # type: ignore[no-untyped-def]
    """Awaits a call that must fail with ``code``; returns its unpacked details."""
    try:
        await awaitable
    except grpc.RpcError as exc:
        details = details_of(exc)
        assert details.code == code, (
            f"expected {code.name}, got {details.code.name}: {details.message}"
        )
        return details
    raise AssertionError(f"expected {code.name}, but the call succeeded")

"""Channels to the mesh that carry an API key on every call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from mlmesh_chassis.interceptors import client_interceptors

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class _BearerKey:
    def __init__(self, api_key: str) -> None:
        self._header = ("authorization", f"Bearer {api_key}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()))
        if "authorization" not in metadata:
            metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), requests)


class _UnaryUnary(_BearerKey, grpc.aio.UnaryUnaryClientInterceptor):
    pass


class _UnaryStream(_BearerKey, grpc.aio.UnaryStreamClientInterceptor):
    pass


class _StreamUnary(_BearerKey, grpc.aio.StreamUnaryClientInterceptor):
    pass


class _StreamStream(_BearerKey, grpc.aio.StreamStreamClientInterceptor):
    pass


def api_key_interceptors(api_key: str) -> list[Any]:
    return [cls(api_key) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def mesh_channel(
    target: str, api_key: str = "", options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A channel through Envoy: trace context, request ids and the API key."""
    # The key first: the chassis' interceptors add this process's own service
    # key only to calls that carry none.
    interceptors = [*(api_key_interceptors(api_key) if api_key else []), *client_interceptors()]
    return grpc.aio.insecure_channel(
        target,
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *options,
        ],
    )

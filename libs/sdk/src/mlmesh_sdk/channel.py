"""Channels to the mesh that carry an API key on every call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from mlmesh_chassis.channels import MESSAGE_SIZE_OPTIONS
from mlmesh_chassis.interceptors import api_key_interceptors, client_interceptors


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
            *MESSAGE_SIZE_OPTIONS,
            *options,
        ],
    )

"""Following a model reference as its alias moves.

Serving components (the LLM service, the Triton deployer) hold a model
reference such as ``digits@champion``. ``follow`` yields the version it
resolves to now, then again each time the registry's event stream says the
alias moved, reconnecting (and re-resolving) after any failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import grpc
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc

from mlmesh_sdk.reference import format_reference
from mlmesh_sdk.registry import RegistryClient

log = logging.getLogger("mlmesh.sdk.follow")
# Longest wait between two tries of a version that keeps failing to load.
MAX_RETRY_SECONDS = 300.0


def backoff_delays(first_s: float, cap_s: float = MAX_RETRY_SECONDS) -> Iterator[float]:
    """Waits between tries of one version: ``first_s``, twice that, four
    times... up to ``cap_s``. A broken artifact under a followed alias is
    retried ever more rarely instead of every few seconds forever."""
    delay = max(first_s, 0.0)
    while True:
        yield min(delay, cap_s)
        delay = min(max(delay, 0.001) * 2, cap_s)


async def follow(
    target: str, reference: ModelReference, retry_seconds: float = 2.0
) -> AsyncIterator[pb.ModelVersion]:
    """Yields ``reference``'s version now and after every move; never ends
    for an alias reference (a version or a plain name is resolved once)."""
    current = 0
    after = 0
    text = format_reference(reference)
    while True:
        try:
            async with RegistryClient(target) as registry:
                version = await registry.resolve(reference)
                if version.version != current:
                    current = version.version
                    yield version
                if reference.WhichOneof("selector") != "alias":
                    return
                events = registry.stub.WatchEvents(
                    rpc.WatchEventsRequest(models=[reference.model], after_sequence=after)
                )
                async for event in events:
                    after = event.sequence
                    moved = event.alias_event
                    if (
                        event.WhichOneof("event") != "alias_event"
                        or moved.alias != reference.alias
                        or moved.to_version in (0, current)
                    ):
                        continue
                    version = await registry.resolve(reference)
                    if version.version != current:
                        current = version.version
                        yield version
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, OSError) as error:
            detail = (
                f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
                if isinstance(error, grpc.RpcError)
                else str(error)
            )
            log.warning("following %s: %s; retrying in %.1fs", text, detail, retry_seconds)
            await asyncio.sleep(retry_seconds)

"""Helpers of the batch service tests (a module of its own: test modules
import it, and a module named conftest would clash with the others')."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from mlmesh.batch.v1 import batch_service_pb2_grpc
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_BATCH
from mlmesh_batch.config import BatchSettings
from mlmesh_batch.server import build_server
from mlmesh_chassis.auth import ServiceIdentity, service_identity, set_service_identity
from mlmesh_chassis.server import ServiceHost
from mlmesh_chassis.testing import bootstrap_keys_file, keyed_channel


@dataclass
class Registry:
    target: str
    secret: str


@dataclass
class Batch:
    host: ServiceHost
    stub: batch_service_pb2_grpc.BatchServiceStub
    settings: BatchSettings
    data: Path  # where tests put inputs (an allowed root)
    secret: str
    previous_identity: ServiceIdentity


def batch_settings(root: Path, registry: Registry, **extra: Any) -> tuple[BatchSettings, str]:
    keys, secret = bootstrap_keys_file(root, [PLATFORM_SERVICE_BATCH])
    key_file = root / "service.key"
    key_file.write_text(registry.secret)
    defaults: dict[str, Any] = {
        "port": 0,
        "metrics_port": -1,
        "drain_seconds": 0.0,
        "grace_seconds": 1.0,
        "bootstrap_keys_file": keys,
        "service_key_file": key_file,
        "root": root / "batch",
        "registry_target": registry.target,
        "allowed_roots": str(root / "data"),
        "part_rows": 200,
        "part_seconds": 0.5,
    }
    return BatchSettings(**(defaults | extra)), secret


async def start_batch(
    settings: BatchSettings, secret: str, data: Path
) -> tuple[Batch, grpc.aio.Channel]:
    """The service in this process. Its key becomes the process's service
    identity (a chassis global): ``stop_batch`` puts the previous one back,
    so later tests' clients do not call with it."""
    previous = service_identity()
    host = await build_server(settings)
    channel = keyed_channel(f"127.0.0.1:{host.port}", secret)
    await channel.__aenter__()
    stub = batch_service_pb2_grpc.BatchServiceStub(channel)
    return Batch(host, stub, settings, data, secret, previous), channel


async def stop_batch(running: Batch, channel: grpc.aio.Channel) -> None:
    await channel.close()
    await running.host.shutdown()
    set_service_identity(running.previous_identity)

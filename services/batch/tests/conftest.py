"""Fixtures of the batch service tests: a real registry in process holding
the minilm and digits builds (what the deployer registers in the mesh), and
the batch service over gRPC with its local Ray head, started once."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from mlmesh.batch.v1 import batch_service_pb2_grpc
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_BATCH
from mlmesh_batch.config import BatchSettings
from mlmesh_batch.server import build_server
from mlmesh_chassis.server import ServiceHost
from mlmesh_chassis.testing import bootstrap_keys_file, keyed_channel
from mlmesh_registry.testing import start_test_registry
from mlmesh_triton import build


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


@pytest.fixture(scope="session")
async def registry(tmp_path_factory) -> AsyncIterator[Registry]:
    root = tmp_path_factory.mktemp("registry")
    host, secret = await start_test_registry(root)
    target = f"127.0.0.1:{host.port}"
    builds = tmp_path_factory.mktemp("builds")
    os.environ["MLMESH_API_KEY"] = secret  # build.register's client
    try:
        build.build_digits(builds / "digits")
        await build.register(target, "digits", builds / "digits")
        build.build_minilm(builds / "minilm")
        await build.register(target, "minilm", builds / "minilm")
    finally:
        os.environ.pop("MLMESH_API_KEY", None)
    yield Registry(target, secret)
    await host.shutdown()


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


async def start_batch(settings: BatchSettings, secret: str, data: Path) -> tuple[Batch, grpc.aio.Channel]:
    host = await build_server(settings)
    channel = keyed_channel(f"127.0.0.1:{host.port}", secret)
    await channel.__aenter__()
    stub = batch_service_pb2_grpc.BatchServiceStub(channel)
    return Batch(host, stub, settings, data, secret), channel


@pytest.fixture(scope="session")
async def batch(tmp_path_factory, registry) -> AsyncIterator[Batch]:
    root = tmp_path_factory.mktemp("batch")
    (root / "data").mkdir()
    settings, secret = batch_settings(root, registry)
    running, channel = await start_batch(settings, secret, root / "data")
    yield running
    await channel.close()
    await running.host.shutdown()

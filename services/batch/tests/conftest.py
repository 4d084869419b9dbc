"""Fixtures of the batch service tests: a real registry in process holding
the minilm and digits builds (what the deployer registers in the mesh), and
the batch service over gRPC with its local Ray head, started once."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from batchkit import Batch, Registry, batch_settings, start_batch, stop_batch
from mlmesh_registry.testing import start_test_registry
from mlmesh_triton import build


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


@pytest.fixture(scope="module")
async def batch(tmp_path_factory, registry) -> AsyncIterator[Batch]:
    root = tmp_path_factory.mktemp("batch")
    (root / "data").mkdir()
    settings, secret = batch_settings(root, registry)
    running, channel = await start_batch(settings, secret, root / "data")
    yield running
    await stop_batch(running, channel)

"""Fixtures of the review service tests: a real registry in process (the
exports' destination) and the review service over gRPC on SQLite, started
once per module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from mlmesh_registry.testing import start_test_registry
from reviewkit import Review, start_review, stop_review


@pytest.fixture(scope="session")
async def review_registry(tmp_path_factory) -> AsyncIterator[tuple[str, str]]:
    root = tmp_path_factory.mktemp("registry")
    host, secret = await start_test_registry(root)
    yield f"127.0.0.1:{host.port}", secret
    await host.shutdown()


@pytest.fixture(scope="module")
async def review(tmp_path_factory, review_registry) -> AsyncIterator[Review]:
    target, secret = review_registry
    running = await start_review(tmp_path_factory.mktemp("review"), target, secret)
    yield running
    await stop_review(running)

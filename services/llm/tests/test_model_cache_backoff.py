"""The model manager retries a version that keeps failing with exponential
backoff, and says when its artifact is refused."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mlmesh.registry.v1.model_pb2 import ModelVersion
from mlmesh_llm import models
from mlmesh_llm.models import ModelManager
from mlmesh_sdk.snapshot import UnsafeArchiveError
from mlmesh_serving import ServedVersions


async def test_a_refused_artifact_is_retried_ever_more_rarely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def one_version(*_: Any) -> AsyncIterator[ServedVersions]:
        yield ServedVersions(ModelVersion(model="tiny-llama", version=3), frozenset())

    monkeypatch.setattr(models, "follow_served", one_version)
    manager = ModelManager(
        ["tiny-llama@champion"],
        "127.0.0.1:1",
        tmp_path,
        engine_factory=lambda folder: None,  # type: ignore[arg-type,return-value]
        retry_seconds=1.0,
        max_retry_seconds=5.0,
    )
    tries = 0
    sleeps: list[float] = []

    async def apply(served: Any, wanted: ServedVersions) -> None:
        nonlocal tries
        tries += 1
        if tries <= 5:
            raise UnsafeArchiveError("the archive expands to more than 1000 bytes")
        served.current = object()

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    monkeypatch.setattr(manager, "_apply", apply)
    manager._sleep = sleep  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="mlmesh.llm.models"):
        await manager._follow(manager.served[0])
    assert sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert manager.ready.is_set()
    assert "tiny-llama/3 yet: its artifact is refused: the archive expands" in caplog.text

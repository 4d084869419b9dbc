"""A version that keeps failing to deploy is retried with exponential backoff."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mlmesh.registry.v1.model_pb2 import ModelVersion
from mlmesh_deployer import deployer as deployer_module
from mlmesh_deployer.deployer import State, TritonDeployer
from mlmesh_sdk.snapshot import UnsafeArchiveError
from mlmesh_serving import ServedVersions


async def test_a_refused_artifact_is_retried_ever_more_rarely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def one_version(*_: Any) -> AsyncIterator[ServedVersions]:
        yield ServedVersions(ModelVersion(model="digits", version=7), frozenset())

    monkeypatch.setattr(deployer_module, "follow_served", one_version)
    deployer = TritonDeployer(
        ["digits@champion"],
        "127.0.0.1:1",
        triton=None,  # type: ignore[arg-type]
        repository=tmp_path / "repo",
        cache_dir=tmp_path / "cache",
        retry_seconds=2.0,
        max_retry_seconds=20.0,
    )
    tries: list[int] = []
    sleeps: list[float] = []

    async def roll(deployment: Any, wanted: ServedVersions) -> None:
        tries.append(wanted.served.version)
        if len(tries) <= 6:
            raise UnsafeArchiveError("archive member 'weights.bin' is a sparse file")
        deployment.set(State.READY)

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    monkeypatch.setattr(deployer, "_roll", roll)
    deployer._sleep = sleep  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="mlmesh.deployer"):
        await deployer._follow(deployer.deployments[0])
    assert sleeps == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    assert len(tries) == 7
    assert deployer.ready.is_set()
    assert "digits/7: its artifact is refused: archive member 'weights.bin' is a sparse file" in (
        caplog.text
    )
    assert "retrying in 16 s" in caplog.text

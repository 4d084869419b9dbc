"""What the local runner binds: Envoy's listener and Triton on loopback only."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
from mlmesh_runner import __main__ as runner_cli
from mlmesh_runner.catalog import CATALOG, RunContext
from mlmesh_runner.supervisor import Mesh


def test_envoy_listens_on_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["mlmesh-run"])
    assert runner_cli._parse().host == "127.0.0.1"
    assert inspect.signature(Mesh).parameters["listen_host"].default == "127.0.0.1"


def test_triton_is_reachable_only_from_this_machine(tmp_path: Path) -> None:
    """gRPC on loopback, no HTTP and no metrics port at all; Envoy does not route it."""
    (triton,) = [spec for spec in CATALOG if spec.name == "triton"]
    argv = list(triton.command(RunContext(tmp_path, {}), 8001))
    assert "--grpc-address=127.0.0.1" in argv
    assert "--grpc-port=8001" in argv
    assert "--allow-http=false" in argv
    assert "--allow-metrics=false" in argv
    # Nothing widens it again later on the command line.
    assert not [a for a in argv if a.startswith(("--http-", "--metrics-", "--allow-grpc=false"))]
    assert [a for a in argv if a.startswith("--grpc-address")] == ["--grpc-address=127.0.0.1"]
    assert triton.routed is False

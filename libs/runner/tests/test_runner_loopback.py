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


async def _listening(port: int) -> bool:
    import asyncio

    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def _slow_server(delay_s: float):  # type: ignore[no-untyped-def]
    """argv of a program that listens on the given port after ``delay_s``."""

    def command(ctx: RunContext, port: int) -> list[str]:
        script = (
            f"import socket, time; time.sleep({delay_s!r}); s = socket.socket(); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"
        )
        return [sys.executable, "-c", script]

    return command


async def test_slow_starters_start_together_in_the_background(tmp_path: Path) -> None:
    """Two services that take 2 s each to listen, started in the background
    on ports the runner picked: the mesh is up in about 2 s, not 4, and the
    services after them knew their addresses from the start."""
    import time

    from mlmesh_chassis.registration import ServiceRegistration

    slow = [
        ServiceRegistration(
            name=name,
            command=_slow_server(2.0),
            services=lambda: [],
            env_prefix=f"MLMESH_{name.upper()}_",
            port_discovery="listening-socket",
            ready=_listening,
            routed=False,
            start_in_background=True,
        )
        for name in ("slowa", "slowb")
    ]
    mesh = Mesh(tmp_path, listen_port=0, admin_port=0, catalog=slow)
    started = time.monotonic()
    try:
        ready = await mesh.start()
        took = time.monotonic() - started
        ports = {name: ready["services"][name]["port"] for name in ("slowa", "slowb")}
        assert all(port > 0 for port in ports.values())
        assert mesh.context().ports == ports
        assert took < 3.8, f"the slow starters were waited for one after the other ({took:.1f} s)"
    finally:
        await mesh.stop()

"""The container health probe against a real gRPC server with grpc health."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from mlmesh_chassis import healthprobe

SERVICE = "mlmesh.registry.v1.RegistryService"


@pytest.fixture
def server() -> Iterator[tuple[int, health.HealthServicer]]:
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        yield port, servicer
    finally:
        grpc_server.stop(None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serving_is_zero(server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = server
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert healthprobe.main(["--target", f"127.0.0.1:{port}", "--service", SERVICE]) == 0


def test_not_serving_is_one(server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = server
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthprobe.main(["--target", f"127.0.0.1:{port}", "--service", SERVICE]) == 1
    # Flipping to SERVING is seen by the next probe.
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert healthprobe.main(["--target", f"127.0.0.1:{port}", "--service", SERVICE]) == 0


def test_unknown_service_is_not_serving(server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = server
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert healthprobe.main(["--target", f"127.0.0.1:{port}", "--service", "no.such.Svc"]) == 1


def test_unreachable_is_two_within_the_deadline() -> None:
    start = time.monotonic()
    code = healthprobe.main(["--target", f"127.0.0.1:{_free_port()}", "--timeout", "1"])
    assert code == 2
    assert time.monotonic() - start < 3


def test_a_silent_peer_is_bounded_by_the_deadline() -> None:
    # Accepts TCP connections (the backlog) but never speaks HTTP/2.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        start = time.monotonic()
        code = healthprobe.main(["--target", f"127.0.0.1:{port}", "--timeout", "1"])
        elapsed = time.monotonic() - start
    assert code == 2
    assert 0.9 <= elapsed < 3


def test_port_file(server: tuple[int, health.HealthServicer], tmp_path: Path) -> None:
    port, servicer = server
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    port_file = tmp_path / "svc.port"
    # Not written yet: the service is not serving.
    assert healthprobe.main(["--port-file", str(port_file), "--service", SERVICE]) == 2
    port_file.write_text(json.dumps({"port": port, "metrics_port": 0, "pid": 1}))
    assert healthprobe.main(["--port-file", str(port_file), "--service", SERVICE]) == 0


@pytest.mark.parametrize(
    "content",
    ['{"port": 0}', '{"port": 70000}', '{"port": true}', '{"port": "80"}', "[]", "{", "x" * 5000],
)
def test_hostile_port_files_are_usage_errors(tmp_path: Path, content: str) -> None:
    port_file = tmp_path / "svc.port"
    port_file.write_text(content)
    assert healthprobe.main(["--port-file", str(port_file)]) == 64


@pytest.mark.parametrize(
    "args",
    [
        ["--target", "127.0.0.1:99999"],
        ["--target", "127.0.0.1"],
        ["--target", "unix:/tmp/x"],
        ["--target", "dns:///evil:80"],
        ["--target", "a b:80"],
        ["--target", "127.0.0.1:80", "--service", "bad name"],
        ["--target", "127.0.0.1:80", "--service", "x" * 300],
        ["--target", "127.0.0.1:80", "--timeout", "0"],
        ["--target", "127.0.0.1:80", "--timeout", "nan"],
        ["--target", "127.0.0.1:80", "--timeout", "1e9"],
        [],
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TARGET", "PORT_FILE", "SERVICE", "TIMEOUT"):
        monkeypatch.delenv(f"MLMESH_HEALTH_{name}", raising=False)
    assert healthprobe.main(args) == 64


def test_the_module_runs_from_env_defaults(server: tuple[int, health.HealthServicer]) -> None:
    """As a container HEALTHCHECK runs it: no arguments, everything from the env."""
    port, servicer = server
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    env = {
        **os.environ,
        "MLMESH_HEALTH_TARGET": f"127.0.0.1:{port}",
        "MLMESH_HEALTH_SERVICE": SERVICE,
        "MLMESH_HEALTH_TIMEOUT": "5",
    }
    run = subprocess.run(
        [sys.executable, "-m", "mlmesh_chassis.healthprobe"], env=env, timeout=30, check=False
    )
    assert run.returncode == 0
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    run = subprocess.run(
        [sys.executable, "-m", "mlmesh_chassis.healthprobe"],
        env=env,
        timeout=30,
        check=False,
        capture_output=True,
    )
    assert run.returncode == 1
    assert b"not serving" in run.stderr

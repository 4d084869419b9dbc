"""A real redis-server per test session, on a unix socket in a temp dir."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Starts redis-server; yields (url, stop, start) so a test can take it down."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is required (the machine's Redis package provides it)")
    folder = tmp_path_factory.mktemp("redis")
    socket = folder / "redis.sock"
    state: dict[str, subprocess.Popen] = {}

    def start() -> None:
        state["process"] = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--unixsocket",
                str(socket),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            if socket.exists():
                return
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop() -> None:
        process = state.pop("process", None)
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        socket.unlink(missing_ok=True)

    start()
    yield f"unix://{socket}", stop, start
    stop()

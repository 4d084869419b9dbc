"""Starting and stopping the real mesh (the runner as a subprocess) for tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class MeshInfo:
    backend: str
    address: str
    admin: str
    state_dir: Path
    services: dict[str, dict]
    api_key: str = ""

    def port(self, service: str) -> int:
        return int(self.services[service]["port"])


def start_mesh(
    state_dir: Path, env: dict[str, str], services: str = "", extra_args: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, dict]:
    ready = state_dir / "ready.json"
    argv = [
        sys.executable,
        "-m",
        "mlmesh_runner",
        "--state-dir",
        str(state_dir),
        "--port",
        "0",
        "--admin-port",
        "0",
    ]
    if services:
        argv += ["--services", services]
    argv += list(extra_args)
    with (state_dir / "runner.log").open("wb") as log:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 240
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(f"runner exited: {(state_dir / 'runner.log').read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError((state_dir / "runner.log").read_text())
        time.sleep(0.1)
    return process, json.loads(ready.read_text())


def stop_mesh(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

"""The Ray cluster jobs run on.

**Default: a local head this service starts** (``ray start --head --block``
in a session of its own, on loopback, with a token of its own): it stays up
between jobs, so a job's driver connects in about a second and finds warm
worker processes, instead of starting Ray (7 s here) and its workers for
every job. It survives a restart of the service, which finds it again by
``<root>/ray/head.json``; it stops with the service's graceful shutdown.

**At scale: a Ray cluster** (``MLMESH_BATCH_RAY_ADDRESS``: a KubeRay head,
or ``ray start --head`` on another machine plus workers), with its token
file (``MLMESH_BATCH_RAY_TOKEN_FILE``) when the cluster uses token auth.
The drivers connect to it unchanged.

Ray's token authentication is on for the local head: the token is in
``<root>/ray/token`` (mode 0600), and drivers get its path in
``RAY_AUTH_TOKEN_PATH``. Without it, anyone on the machine could run code on
the cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mlmesh.batch.cluster")


@dataclass(frozen=True)
class RayCluster:
    address: str  # host:port of the GCS
    token_file: str  # "" : no token auth
    local_pid: int = 0  # the `ray start --block` process of a local head

    def env(self) -> dict[str, str]:
        """What a driver needs in its environment to connect."""
        if not self.token_file:
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_file}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"ray" in cmdline and b"--head" in cmdline


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def ray_executable() -> str:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else (shutil.which("ray") or "ray")


def start_local_head(folder: Path, cpus: int, timeout_s: float = 90.0) -> RayCluster:
    """The local head of ``folder`` (reused when one is still up)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "head.json"
    if record.exists():
        try:
            known = json.loads(record.read_text())
            if _alive(known["pid"]) and _reachable(known["port"]):
                log.info("re-attached to the local Ray head (pid %d)", known["pid"])
                return RayCluster(f"127.0.0.1:{known['port']}", known["token_file"], known["pid"])
        except (OSError, ValueError, KeyError):
            pass
        stop_local_head(folder)
    token = folder / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    with (folder / "head.log").open("ab") as logfile:
        process = _spawn(port, cpus, env, logfile)
    _STARTED[str(folder)] = process
    record.write_text(json.dumps({"pid": process.pid, "port": port, "token_file": str(token)}))
    deadline = time.monotonic() + timeout_s
    while not _reachable(port):
        if process.poll() is not None:
            raise RuntimeError(
                f"ray start exited ({process.returncode}); see {folder / 'head.log'}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"the local Ray head did not come up in {timeout_s:.0f} s")
        time.sleep(0.2)
    log.info("local Ray head up on 127.0.0.1:%d (pid %d, %d CPUs)", port, process.pid, cpus)
    return RayCluster(f"127.0.0.1:{port}", str(token), process.pid)


# The heads this process started (kept, so they are reaped when stopped).
_STARTED: dict[str, subprocess.Popen[bytes]] = {}


def _spawn(port: int, cpus: int, env: dict[str, str], logfile: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            ray_executable(),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--num-cpus={cpus}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=logfile,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # outlives a restart of the service
    )


def stop_local_head(folder: Path, grace_s: float = 10.0) -> None:
    """Stops the local head of ``folder`` and what it started."""
    record = folder / "head.json"
    try:
        pid = int(json.loads(record.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    if _alive(pid):
        # `ray start --block` stops its raylet, GCS and workers on SIGINT (it
        # was seen to sit through SIGTERM for 20 s and more).
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    # Whatever of its session is left (it leads one of its own).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    started = _STARTED.pop(str(folder), None)
    if started is not None:
        try:
            started.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()
    record.unlink(missing_ok=True)

"""Starting and stopping the real mesh (the runner as a subprocess) for tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A whole mesh builds its models, provisions Triton and starts every service;
# on a busy 2-core machine that has taken over two minutes.
START_TIMEOUT_S = 480


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


def mesh_of(*names: str) -> str:
    """The runner's ``--services`` for a mesh of ``names`` and the key
    directory every chassis service follows, in start order (both from the
    services' registrations)."""
    from mlmesh_chassis.registration import key_directory_service, registrations

    known = [r.name for r in registrations()]
    wanted = {*names, key_directory_service() or ""} - {""}
    unknown = wanted - set(known)
    if unknown:
        raise ValueError(f"no registered services {sorted(unknown)}; registered: {known}")
    return ",".join(name for name in known if name in wanted)


def start_mesh(
    state_dir: Path, env: dict[str, str], services: str = "", extra_args: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, dict]:
    """Starts the runner with ``services`` (default: every registered one)."""
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
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not ready.exists():
            if process.poll() is not None:
                raise RuntimeError(f"runner exited with {process.returncode}:\n{_logs(state_dir)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mesh not up after {START_TIMEOUT_S} s:\n{_logs(state_dir)}")
            time.sleep(0.1)
    except BaseException:
        # Whatever stopped the wait (its deadline, a failure, an interrupt),
        # no mesh is left running behind the test session.
        _kill(process)
        raise
    described = json.loads(ready.read_text())
    # The ready file names the admin key's file (0600); it holds no secret.
    described["api_key"] = Path(described["admin_key_file"]).read_text().strip()
    return process, described


def stop_mesh(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _kill(process)


def _kill(process: subprocess.Popen) -> None:
    """Kills the runner and everything it started (its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _logs(state_dir: Path, tail_lines: int = 40) -> str:
    """The runner's log and the last lines of every service's log: what a
    failed start in CI shows the next reader."""
    parts = [f"--- runner.log\n{_tail(state_dir / 'runner.log', 200)}"]
    for log in sorted((state_dir / "logs").glob("*.log")):
        parts.append(f"--- {log.name}\n{_tail(log, tail_lines)}")
    return "\n".join(parts)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"({error})"


# ---- the gateway's API, as the mesh tests call it --------------------------------


def generate_request(
    text: str = "The gateway serves", region: str = "local", request_id: str = "", **sampling
):
    """A GatewayService/Generate request for tiny-llama@champion."""
    from mlmesh.common.v1 import model_reference_pb2
    from mlmesh.gateway.v1 import gateway_service_pb2
    from mlmesh.llm.v1 import llm_pb2, llm_service_pb2

    return gateway_service_pb2.GenerateRequest(
        region=region,
        request=llm_service_pb2.GenerateRequest(
            model=model_reference_pb2.ModelReference(model="tiny-llama", alias="champion"),
            text=text,
            request_id=request_id,
            sampling=llm_pb2.SamplingParams(**sampling),
        ),
    )


async def usage_buckets(usage, key_id: str) -> list:
    """A key's usage buckets over the last hour, from a UsageService stub."""
    import datetime as dt

    from mlmesh.gateway.v1 import usage_service_pb2

    now = dt.datetime.now(dt.UTC)
    request = usage_service_pb2.GetUsageRequest(key_ids=[key_id])
    request.start_time.FromDatetime(now - dt.timedelta(hours=1))
    request.end_time.FromDatetime(now + dt.timedelta(minutes=1))
    return list((await usage.GetUsage(request)).buckets)

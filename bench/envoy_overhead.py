"""Envoy's own cost per call: the mesh's rendered Envoy config in front of a
trivial upstream (a chassis server whose only service is gRPC health).

The registry's resolve benchmark measures Envoy plus contention with a busy
Python upstream on 2 cores; this one isolates the proxy. Same config as the
mesh (routes, access log, request ids, health checks, outlier detection).

    .venv/bin/python bench/envoy_overhead.py [--requests 4000] [--levels 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
from mlmesh_chassis.config import ServiceSettings
from mlmesh_chassis.server import run_until_signalled, start_service
from mlmesh_runner.catalog import ServiceSpec
from mlmesh_runner.supervisor import Mesh

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


class EchoSettings(ServiceSettings):
    model_config = {**ServiceSettings.model_config, "env_prefix": "MLMESH_ECHO_"}
    service_name: ClassVar[str] = "echo"


async def serve() -> None:
    host = await start_service(
        EchoSettings(metrics_port=-1), lambda server: [HEALTH.full_name], error_domain="mlmesh.echo"
    )
    await run_until_signalled(host)


async def measure(target: str, concurrency: int, requests: int) -> list[float]:
    latencies: list[float] = []
    async with _common.channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=HEALTH.full_name)
        for _ in range(200):
            await stub.Check(request)

        async def worker(n: int) -> None:
            for _ in range(n):
                start = time.perf_counter()
                await stub.Check(request)
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return sorted(latencies)


async def main(args: Any) -> int:
    spec = ServiceSpec(
        name="echo",
        command=lambda ctx, port: [sys.executable, __file__, "--serve"],
        services=lambda: [HEALTH],
        env_prefix="MLMESH_ECHO_",
    )
    workdir = Path(_common.tempfile.mkdtemp(prefix="mlmesh-bench-"))
    mesh = Mesh(
        workdir / "state",
        listen_port=0,
        admin_port=0,
        catalog=[spec],
        envoy_concurrency=args.envoy_concurrency,
    )
    results: dict[str, Any] = {}
    try:
        ready = await mesh.start()
        targets = {
            "envoy": ready["address"],
            "direct": f"127.0.0.1:{ready['services']['echo']['port']}",
        }
        rows = []
        for level in args.levels:
            samples: dict[str, list[float]] = {"envoy": [], "direct": []}
            for round_ in range(4):  # alternate the order to spread the noise
                order = ["envoy", "direct"] if round_ % 2 == 0 else ["direct", "envoy"]
                for name in order:
                    samples[name] += await measure(targets[name], level, args.requests // 4)
            level_result = {}
            for name, values in samples.items():
                values.sort()
                level_result[name] = {
                    "p50_ms": _common.percentile(values, 50) * 1e3,
                    "p99_ms": _common.percentile(values, 99) * 1e3,
                }
                rows.append(
                    [f"c={level}", name, level_result[name]["p50_ms"], level_result[name]["p99_ms"]]
                )
            level_result["envoy_added_p50_ms"] = (
                level_result["envoy"]["p50_ms"] - level_result["direct"]["p50_ms"]
            )
            rows.append([f"c={level}", "envoy added", level_result["envoy_added_p50_ms"], ""])
            results[str(level)] = level_result
        print("Envoy in front of a trivial gRPC upstream (health Check), ms")
        print(_common.table(["level", "target", "p50", "p99"], rows))
    finally:
        await mesh.stop()
        _common.shutil.rmtree(workdir, ignore_errors=True)
    args.output = None
    path = _common.write_json(
        "envoy_overhead",
        args,
        {
            "benchmark": "envoy_overhead",
            "params": {"requests": args.requests, "levels": args.levels},
            "environment": _common.environment(args),
            "results": results,
        },
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    if "--serve" in sys.argv:
        asyncio.run(serve())
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--envoy-concurrency", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("-v", "--verbose", action="store_true")
    sys.exit(_common.run(main, parser.parse_args()))

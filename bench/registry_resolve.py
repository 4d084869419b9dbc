"""ResolveModelReference(model@champion) latency and throughput, through Envoy
and straight to the registry's port, at several client concurrencies.

    python bench/registry_resolve.py [--requests 3000] [--warmup 200] [--concurrency 1,32]

Starts its own mesh (registry, the gateway for keys, Envoy) in a temporary
state directory, creates an API key with the REGISTRY scope (every call, on
both paths, carries it: Envoy checks no key, the registry checks every
caller itself, in process), creates a model with 3 versions and the alias
`champion` (-> version 2), then for each concurrency level: a warm-up of
--warmup calls per target, then --requests calls per target split into
--rounds rounds; each round runs both targets
back to back, alternating which goes first (envoy, direct / direct, envoy /
...), so drift on the machine hits both alike. One grpc.aio channel per
target; concurrency N = N asyncio tasks each making calls one after another.

Prints p50/p90/p99 latency (ms), requests/s, the Envoy-added p50 (envoy p50 -
direct p50) and the envoy/direct throughput ratio; the goal is "Envoy adds
under 0.3 ms at p50". Writes bench/results/registry_resolve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import sys
import time
from typing import Any

import _common as common
import grpc
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_pb2
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh.registry.v1 import registry_service_pb2_grpc

NAME = "registry_resolve"
MODEL = "bench-resolve"
ALIAS = "champion"
CHAMPION = 2
GOAL_MS = 0.3
CALL_TIMEOUT = 10.0


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=3000,
        help="measured calls per target and concurrency level (default 3000)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=200,
        help="unmeasured calls per target before each level (default 200)",
    )
    parser.add_argument(
        "--concurrency", default="1,32", help="comma-separated concurrency levels (default 1,32)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="rounds per level; targets alternate order each round (default 6)",
    )
    common.add_common_args(parser)
    args = parser.parse_args()
    try:
        args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        parser.error("--concurrency must be comma-separated integers")
    if not args.levels or min(args.levels) < 1 or args.requests < 1 or args.rounds < 1:
        parser.error("concurrency levels, --requests and --rounds must be >= 1")
    args.rounds = min(args.rounds, args.requests)
    return args


async def setup(stub: Any) -> None:
    """A model with 3 small versions and champion -> version CHAMPION."""
    for n in range(1, 4):
        data = f"bench artifact {n}\n".encode() * 64

        async def messages(data: bytes = data):  # type: ignore[no-untyped-def]
            yield rpc.UploadModelVersionRequest(
                header=rpc.UploadHeader(
                    model=MODEL,
                    create_model=True,
                    format="bench",
                    size_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
            yield rpc.UploadModelVersionRequest(chunk=data)

        reply = await stub.UploadModelVersion(messages(), timeout=CALL_TIMEOUT)
        assert reply.model_version.version == n, reply
    await stub.SetAlias(
        rpc.SetAliasRequest(model=MODEL, alias=ALIAS, version=CHAMPION, reason="bench"),
        timeout=CALL_TIMEOUT,
    )


REQUEST = rpc.ResolveModelReferenceRequest(
    reference=model_reference_pb2.ModelReference(model=MODEL, alias=ALIAS)
)


class Burst:
    """`total` calls spread over `concurrency` tasks; latencies in ns."""

    def __init__(self) -> None:
        self.latencies: list[int] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.seconds = 0.0

    async def run(self, stub: Any, total: int, concurrency: int) -> None:
        remaining = total
        call = stub.ResolveModelReference

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter_ns()
                try:
                    reply = await call(REQUEST, timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    self.errors[error.code().name] += 1
                    continue
                self.latencies.append(time.perf_counter_ns() - started)
                if reply.model_version.version != CHAMPION:
                    self.errors["WRONG_VERSION"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
        self.seconds += time.perf_counter() - started


def summarize(burst: Burst, cpu: dict[str, float]) -> dict[str, Any]:
    values = sorted(burst.latencies)
    ms = [v / 1e6 for v in values]
    done = len(values)
    return {
        "ok": done,
        "errors": dict(burst.errors),
        "seconds": round(burst.seconds, 3),
        "rps": done / burst.seconds if burst.seconds else float("nan"),
        "p50_ms": common.percentile(ms, 50),
        "p90_ms": common.percentile(ms, 90),
        "p99_ms": common.percentile(ms, 99),
        "mean_ms": sum(ms) / done if done else float("nan"),
        "max_ms": ms[-1] if ms else float("nan"),
        "cpu_seconds": cpu,
        "cpu_us_per_request": {
            k: round(v / done * 1e6, 1) if done else None for k, v in cpu.items()
        },
    }


async def main(args: argparse.Namespace) -> int:
    results: dict[int, dict[str, Any]] = {}
    async with common.running_mesh(args, ("registry", "gateway")) as (mesh, ready, _workdir):
        targets = {
            "envoy": ready["address"],
            "direct": f"127.0.0.1:{ready['services']['registry']['port']}",
        }
        print(
            f"envoy {targets['envoy']} (--concurrency {args.envoy_concurrency}), "
            f"direct {targets['direct']}; {args.requests} calls per target and level "
            f"in {args.rounds} rounds, warm-up {args.warmup}",
            flush=True,
        )
        meter = common.CpuMeter(common.mesh_pids(mesh))
        secret = await common.app_key(
            targets["envoy"], mesh.admin_key(), gateway_pb2.PLATFORM_SERVICE_REGISTRY
        )
        async with (
            common.channel(targets["envoy"], api_key=secret) as envoy_ch,
            common.channel(targets["direct"], api_key=secret) as direct_ch,
        ):
            stubs = {
                "envoy": registry_service_pb2_grpc.RegistryServiceStub(envoy_ch),
                "direct": registry_service_pb2_grpc.RegistryServiceStub(direct_ch),
            }
            await setup(stubs["direct"])
            for name, stub in stubs.items():
                reply = await stub.ResolveModelReference(REQUEST, timeout=CALL_TIMEOUT)
                if reply.model_version.version != CHAMPION:
                    raise RuntimeError(
                        f"{name}: {MODEL}@{ALIAS} resolved to "
                        f"{reply.model_version.version}, not {CHAMPION}"
                    )
            stats_before = common.envoy_stats(
                mesh, ["cluster.registry.upstream_", "http.ingress.downstream_cx_total"]
            )
            for level in args.levels:
                for name in ("envoy", "direct"):
                    warm = Burst()
                    await warm.run(stubs[name], args.warmup, level)
                    if warm.errors:
                        print(f"  warm-up {name} c={level}: errors {dict(warm.errors)}")
                bursts = {"envoy": Burst(), "direct": Burst()}
                cpu: dict[str, dict[str, float]] = {"envoy": {}, "direct": {}}
                per_round = [
                    args.requests // args.rounds + (1 if r < args.requests % args.rounds else 0)
                    for r in range(args.rounds)
                ]
                for r, count in enumerate(per_round):
                    order = ("envoy", "direct") if r % 2 == 0 else ("direct", "envoy")
                    for name in order:
                        before = meter.sample()
                        await bursts[name].run(stubs[name], count, level)
                        for key, value in meter.delta(before, meter.sample()).items():
                            cpu[name][key] = round(cpu[name].get(key, 0.0) + value, 3)
                results[level] = {
                    name: summarize(bursts[name], cpu[name]) for name in ("envoy", "direct")
                }
                e, d = results[level]["envoy"], results[level]["direct"]
                print(
                    f"  c={level:<3d} envoy p50 {e['p50_ms']:.3f} ms {e['rps']:7.0f}/s | "
                    f"direct p50 {d['p50_ms']:.3f} ms {d['rps']:7.0f}/s",
                    flush=True,
                )
            stats_after = common.envoy_stats(
                mesh, ["cluster.registry.upstream_", "http.ingress.downstream_cx_total"]
            )

    rows, derived = [], {}
    for level, by_target in results.items():
        for name in ("envoy", "direct"):
            s = by_target[name]
            rows.append(
                [
                    f"c={level}",
                    name,
                    s["ok"],
                    sum(s["errors"].values()),
                    s["p50_ms"],
                    s["p90_ms"],
                    s["p99_ms"],
                    s["max_ms"],
                    s["rps"],
                    s["cpu_us_per_request"].get("client"),
                    s["cpu_us_per_request"].get("envoy"),
                    s["cpu_us_per_request"].get("registry"),
                ]
            )
        e, d = by_target["envoy"], by_target["direct"]
        derived[level] = {
            "envoy_added_p50_ms": e["p50_ms"] - d["p50_ms"],
            "envoy_added_p99_ms": e["p99_ms"] - d["p99_ms"],
            "envoy_added_mean_ms": e["mean_ms"] - d["mean_ms"],
            "throughput_ratio_envoy_over_direct": e["rps"] / d["rps"],
        }
    print()
    print("ResolveModelReference(model@champion): latency ms, throughput req/s, CPU us per request")
    print(
        common.table(
            [
                "level",
                "target",
                "ok",
                "err",
                "p50",
                "p90",
                "p99",
                "max",
                "req/s",
                "cpu client",
                "cpu envoy",
                "cpu registry",
            ],
            rows,
        )
    )
    print()
    print(
        common.table(
            ["level", "envoy-added p50 ms", "envoy-added p99 ms", "envoy/direct req/s"],
            [
                [
                    f"c={lvl}",
                    v["envoy_added_p50_ms"],
                    v["envoy_added_p99_ms"],
                    v["throughput_ratio_envoy_over_direct"],
                ]
                for lvl, v in derived.items()
            ],
        )
    )
    goal = None
    if 1 in derived:
        added = derived[1]["envoy_added_p50_ms"]
        goal = added < GOAL_MS
        print(
            f"\ngoal 'Envoy adds under {GOAL_MS} ms at p50' (c=1): "
            f"{'MET' if goal else 'NOT MET'} ({added:.3f} ms)"
        )
    stats_delta = {
        k: v - stats_before.get(k, 0)
        for k, v in stats_after.items()
        if isinstance(v, int)
        and k.endswith(("_total", "_retry", "_active"))
        and v - stats_before.get(k, 0)
    }
    payload = {
        "benchmark": NAME,
        "params": {
            "requests": args.requests,
            "warmup": args.warmup,
            "levels": args.levels,
            "rounds": args.rounds,
            "reference": f"{MODEL}@{ALIAS}",
        },
        "environment": common.environment(args),
        "results": {str(k): v for k, v in results.items()},
        "derived": {str(k): v for k, v in derived.items()},
        "goal": {"envoy_added_p50_ms_below": GOAL_MS, "met_at_c1": goal},
        "envoy_stats_delta": stats_delta,
    }
    print(f"\nresults: {common.write_json(NAME, args, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

"""GatewayService/Generate streaming relay on the null engine: chunks/s one
gateway process relays, against LlmService/Generate straight to the llm
port in the same run, and the gateway process's CPU per chunk and per request.

    .venv/bin/python bench/gateway_streaming.py [--streams 16] [--tokens 2000] \
        [--rounds 4] [--short-requests 1200] [--short-concurrency 16] [--redis] [--key limited]

Starts its own mesh (registry + llm + gateway + Envoy) with
MLMESH_LLM_ENGINE=null (checked through GetModel), whose engine "generates"
instantly, one token per chunk, so what is measured is the relay: Envoy
(the route; Envoy checks no keys), the gateway (key check,
CountTokens round trip to the llm, throttle admit/settle, the relay of every
chunk, the usage ledger write) and the llm service, against the llm service
alone. The key goes as `authorization: Bearer ...` metadata on each gateway
call; --key and --redis as in gateway_overhead.py.

Two phases, each in --rounds rounds with the gateway/direct order alternating:

* streams: a burst is --streams concurrent streams of --tokens tokens on one
  channel per target. Every stream is checked for the exact token count,
  usage.completion_tokens and finish reason LENGTH. Reports chunks/s
  (response messages over the bursts' time), stream p50, CPU microseconds per
  chunk of the client, Envoy, the gateway and the llm, and the gateway's CPU
  milliseconds per stream.
* short requests: --short-requests Generate calls of 1 token each from
  --short-concurrency closed-loop tasks per target, so the gateway's CPU per
  request is its fixed per-request cost (key checks, CountTokens, throttle,
  ledger, one relayed chunk); also the time-to-first-token p50/p99.

The aim: at least 20,000 chunks/s relayed and under 1 ms of gateway CPU per
request. CPU is read from /proc/<pid>/stat (utime + stime, 10 ms
resolution). Writes bench/results/gateway_streaming.json
(gateway_streaming_redis.json with --redis).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time
from typing import Any

import _common as common
import _gateway as gw
import _triton as tb
import grpc
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc
from mlmesh.llm.v1 import llm_pb2, llm_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc

NAME = "gateway_streaming"
SERVICES = ("registry", "llm", "gateway")
MODEL = model_reference_pb2.ModelReference(model="tiny-llama", alias="champion")
CALL_TIMEOUT = 120.0
TARGETS = ("gateway", "direct")
PROMPT = "The model serves tokens fast"
GOAL_CHUNKS_PER_S = 20_000
GOAL_GATEWAY_CPU_MS_PER_REQUEST = 1.0


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--streams", type=int, default=16, help="concurrent streams per burst (default 16)"
    )
    parser.add_argument(
        "--tokens", type=int, default=2000, help="tokens (= chunks) per stream (default 2000)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="bursts per target and phase; targets alternate order each round (default 4)",
    )
    parser.add_argument(
        "--short-requests",
        type=int,
        default=1200,
        help="1-token requests per target for the per-request cost (default 1200; 0: skip)",
    )
    parser.add_argument(
        "--short-concurrency",
        type=int,
        default=16,
        help="closed-loop tasks for the 1-token requests (default 16)",
    )
    gw.add_gateway_args(parser)
    common.add_common_args(parser)
    args = parser.parse_args()
    if min(args.streams, args.tokens, args.rounds, args.short_concurrency) < 1:
        parser.error("--streams, --tokens, --rounds and --short-concurrency must be >= 1")
    if args.short_requests and args.short_requests < args.rounds:
        parser.error("--short-requests must be 0 or >= --rounds")
    if args.tokens > 4000:
        parser.error("--tokens above the null engine's 4096-token context minus the prompt")
    return args


class Burst:
    """Streams of ``tokens`` tokens: ``total`` of them from ``concurrency``
    closed-loop tasks (concurrency == total: one concurrent burst)."""

    def __init__(self) -> None:
        self.chunks = 0
        self.tokens = 0
        self.streams_ok = 0
        self.bad_streams = 0  # wrong token count, usage or finish reason
        self.durations: list[float] = []
        self.ttft: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.first_error = ""
        self.seconds = 0.0

    async def run(
        self,
        target: str,
        stubs: dict[str, Any],
        metadata: tuple[tuple[str, str], ...],
        total: int,
        concurrency: int,
        tokens: int,
    ) -> None:
        inner = llm_rpc.GenerateRequest(
            model=MODEL, text=PROMPT, sampling=llm_pb2.SamplingParams(max_tokens=tokens)
        )
        wrapped = rpc.GenerateRequest(region="local", request=inner)
        remaining = total

        async def one() -> None:
            chunks = count = 0
            final = None
            first = None
            started = time.perf_counter()
            try:
                if target == "gateway":
                    call = stubs["gateway"].Generate(
                        wrapped, metadata=metadata, timeout=CALL_TIMEOUT
                    )
                    async for message in call:
                        chunk = message.response
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - started
                        count += chunk.token_count
                        if chunk.finish_reason:
                            final = chunk
                else:
                    # The llm checks its callers too: the admin key as metadata.
                    async for chunk in stubs["llm"].Generate(
                        inner, metadata=stubs["llm_metadata"], timeout=CALL_TIMEOUT
                    ):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - started
                        count += chunk.token_count
                        if chunk.finish_reason:
                            final = chunk
            except grpc.aio.AioRpcError as error:
                self.errors[error.code().name] += 1
                self.first_error = self.first_error or f"{error.code().name}: {error.details()}"
                return
            finally:
                self.chunks += chunks
                self.tokens += count
            self.durations.append(time.perf_counter() - started)
            if first is not None:
                self.ttft.append(first)
            self.streams_ok += 1
            if (
                count != tokens
                or final is None
                or final.finish_reason != llm_pb2.FINISH_REASON_LENGTH
                or final.usage.completion_tokens != tokens
            ):
                self.bad_streams += 1

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await one()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
        self.seconds += time.perf_counter() - started


def summarize(burst: Burst, cpu: dict[str, float]) -> dict[str, Any]:
    durations = sorted(burst.durations)
    ttft_ms = sorted(v * 1e3 for v in burst.ttft)
    requests = burst.streams_ok
    return {
        "streams_ok": requests,
        "bad_streams": burst.bad_streams,
        "errors": dict(burst.errors),
        "first_error": burst.first_error,
        "chunks": burst.chunks,
        "tokens": burst.tokens,
        "seconds": round(burst.seconds, 3),
        "chunks_per_s": burst.chunks / burst.seconds if burst.seconds else float("nan"),
        "requests_per_s": requests / burst.seconds if burst.seconds else float("nan"),
        "stream_p50_s": common.percentile(durations, 50),
        "stream_max_s": durations[-1] if durations else float("nan"),
        "ttft_p50_ms": common.percentile(ttft_ms, 50),
        "ttft_p99_ms": common.percentile(ttft_ms, 99),
        "cpu_seconds": cpu,
        "cpu_us_per_chunk": {
            k: round(v / burst.chunks * 1e6, 2) if burst.chunks else None for k, v in cpu.items()
        },
        "cpu_ms_per_request": {
            k: round(v / requests * 1e3, 3) if requests else None for k, v in cpu.items()
        },
        "other_cores": gw.other_cores(cpu, burst.seconds),
        "cores_busy": {
            k: round(v / burst.seconds, 2) if burst.seconds else None for k, v in cpu.items()
        },
    }


async def phase(
    disturbance: gw.DisturbanceLog,
    stubs: dict[str, Any],
    metadata: tuple[tuple[str, str], ...],
    meter: common.CpuMeter,
    rounds: int,
    total: int,
    concurrency: int,
    tokens: int,
) -> dict[str, Any]:
    """``rounds`` rounds of ``total`` streams per target (split over the rounds),
    gateway/direct order alternating."""
    bursts = {name: Burst() for name in TARGETS}
    cpu: dict[str, dict[str, float]] = {name: {} for name in TARGETS}
    for r in range(rounds):
        count = total // rounds + (1 if r < total % rounds else 0)
        for name in TARGETS if r % 2 == 0 else TARGETS[::-1]:
            disturbance.check()
            before = meter.sample()
            await bursts[name].run(name, stubs, metadata, count, min(concurrency, count), tokens)
            for key, value in meter.delta(before, meter.sample()).items():
                cpu[name][key] = round(cpu[name].get(key, 0.0) + value, 3)
    return {name: summarize(bursts[name], cpu[name]) for name in TARGETS}


async def main(args: argparse.Namespace) -> int:
    overridden = sorted(k for k in os.environ if k.startswith(("MLMESH_LLM_", "MLMESH_GATEWAY_")))
    os.environ["MLMESH_LLM_ENGINE"] = "null"
    gw.configure_throttle(args.redis)
    name = NAME + ("_redis" if args.redis else "")
    results: dict[str, dict[str, Any]] = {}
    checks: dict[str, Any] = {}
    disturbance = gw.DisturbanceLog()
    try:
        async with common.running_mesh(args, SERVICES) as (mesh, ready, workdir):
            targets = {
                "gateway": ready["address"],
                "direct": f"127.0.0.1:{ready['services']['llm']['port']}",
            }
            admin_key = mesh.admin_key()
            if not admin_key:
                raise RuntimeError("the gateway wrote no admin key")
            pids = common.mesh_pids(mesh)
            checks["gateway_pid"] = ready["services"]["gateway"]["pid"]
            meter = tb.MachineCpuMeter(pids)
            if args.redis and (pid := gw.redis_pid()):
                meter.pids["redis"] = pid  # Redis's own CPU (JSON only)
            async with (
                common.channel(targets["gateway"]) as gateway_ch,
                common.channel(targets["direct"]) as direct_ch,
            ):
                secret, key_info = await gw.make_key(gateway_ch, admin_key, args.key)
                metadata = (("authorization", f"Bearer {secret}"),)
                stubs: dict[str, Any] = {
                    "gateway": gateway_service_pb2_grpc.GatewayServiceStub(gateway_ch),
                    "llm": llm_service_pb2_grpc.LlmServiceStub(direct_ch),
                    "llm_metadata": (("authorization", f"Bearer {admin_key}"),),
                }
                check = await stubs["llm"].GetModel(
                    llm_rpc.GetModelRequest(model=MODEL), metadata=stubs["llm_metadata"]
                )
                if check.model.engine != "null":
                    raise RuntimeError(
                        f"the llm service runs engine {check.model.engine!r}, not null"
                    )
                print(
                    f"envoy {targets['gateway']} (--concurrency {args.envoy_concurrency}), "
                    f"direct {targets['direct']}; null engine; throttle "
                    f"{'redis ' + gw.REDIS_URL if args.redis else 'in-process'}; key {args.key}; "
                    f"{args.rounds} bursts per target of {args.streams} streams x "
                    f"{args.tokens} tokens; {args.short_requests} 1-token requests per target "
                    f"at concurrency {args.short_concurrency}",
                    flush=True,
                )
                calls = 0
                for target in TARGETS:
                    warm = Burst()
                    await warm.run(
                        target, stubs, metadata, args.streams, args.streams, min(args.tokens, 500)
                    )
                    calls += args.streams * (target == "gateway")
                    if warm.errors or warm.bad_streams:
                        print(
                            f"  warm-up {target}: errors {dict(warm.errors)} bad "
                            f"{warm.bad_streams} {warm.first_error}",
                            flush=True,
                        )
                results["streams"] = await phase(
                    disturbance,
                    stubs,
                    metadata,
                    meter,
                    args.rounds,
                    args.rounds * args.streams,
                    args.streams,
                    args.tokens,
                )
                calls += args.rounds * args.streams
                g, d = results["streams"]["gateway"], results["streams"]["direct"]
                print(
                    f"  streams: gateway {g['chunks_per_s']:7.0f} chunks/s, gateway cpu "
                    f"{g['cpu_us_per_chunk'].get('gateway')} us/chunk | direct "
                    f"{d['chunks_per_s']:7.0f} chunks/s",
                    flush=True,
                )
                if args.short_requests:
                    results["short"] = await phase(
                        disturbance,
                        stubs,
                        metadata,
                        meter,
                        args.rounds,
                        args.short_requests,
                        args.short_concurrency,
                        1,
                    )
                    calls += args.short_requests
                    g, d = results["short"]["gateway"], results["short"]["direct"]
                    print(
                        f"  1-token requests: gateway {g['requests_per_s']:6.0f}/s, gateway cpu "
                        f"{g['cpu_ms_per_request'].get('gateway')} ms/request | direct "
                        f"{d['requests_per_s']:6.0f}/s",
                        flush=True,
                    )
                disturbance.check()
                checks["disturbance"] = disturbance.report(
                    [s for by in results.values() for s in by.values()]
                )
                await asyncio.sleep(0.5)  # the last ledger writes
                checks["gateway_generate_calls_made"] = calls
                checks.update(gw.checks_after(workdir / "state", args.redis))
    finally:
        if args.redis:
            try:
                gw.flush_redis()
            except Exception as error:  # cleanup only
                print(f"warning: could not flush {gw.REDIS_URL}: {error}", file=sys.stderr)

    rows = []
    for phase_name, by_target in results.items():
        for target in TARGETS:
            s = by_target[target]
            per = s["cpu_us_per_chunk"]
            rows.append(
                [
                    f"{args.tokens}-token streams"
                    if phase_name == "streams"
                    else "1-token requests",
                    target,
                    s["streams_ok"],
                    sum(s["errors"].values()) + s["bad_streams"],
                    s["chunks"],
                    s["chunks_per_s"],
                    s["requests_per_s"],
                    s["ttft_p50_ms"],
                    per.get("client"),
                    per.get("envoy"),
                    per.get("gateway"),
                    per.get("llm"),
                    s["cpu_ms_per_request"].get("gateway"),
                    s["cores_busy"].get("gateway"),
                    s["other_cores"],
                ]
            )
    derived: dict[str, Any] = {}
    g, d = results["streams"]["gateway"], results["streams"]["direct"]
    derived["chunks_per_s_ratio_gateway_over_direct"] = g["chunks_per_s"] / d["chunks_per_s"]
    derived["gateway_chunks_per_s"] = g["chunks_per_s"]
    derived["gateway_cpu_us_per_chunk"] = g["cpu_us_per_chunk"].get("gateway")
    derived["gateway_cpu_ms_per_stream"] = g["cpu_ms_per_request"].get("gateway")
    if "short" in results:
        gs, ds = results["short"]["gateway"], results["short"]["direct"]
        derived["gateway_cpu_ms_per_request"] = gs["cpu_ms_per_request"].get("gateway")
        derived["short_rps_ratio_gateway_over_direct"] = gs["requests_per_s"] / ds["requests_per_s"]
        derived["short_gateway_added_ttft_p50_ms"] = gs["ttft_p50_ms"] - ds["ttft_p50_ms"]
    print()
    print(
        f"Generate relay, null engine ({'redis' if args.redis else 'in-process'} throttle, key "
        f"{args.key}): {args.streams} streams x {args.tokens} tokens per burst, and 1-token "
        f"requests at concurrency {args.short_concurrency}; CPU us per chunk, gateway CPU ms "
        "per request, cores the gateway and the rest of the machine (other) kept busy"
    )
    print(
        common.table(
            [
                "phase",
                "target",
                "streams",
                "bad",
                "chunks",
                "chunks/s",
                "req/s",
                "ttft p50 ms",
                "cpu client",
                "cpu envoy",
                "cpu gateway",
                "cpu llm",
                "gw ms/req",
                "gw cores",
                "other cores",
            ],
            rows,
        )
    )
    print()
    print(f"gateway/direct chunks/s: {derived['chunks_per_s_ratio_gateway_over_direct']:.3f}")
    goal_chunks = derived["gateway_chunks_per_s"] >= GOAL_CHUNKS_PER_S
    print(
        f"goal 'at least {GOAL_CHUNKS_PER_S} chunks/s relayed': "
        f"{'MET' if goal_chunks else 'NOT MET'} ({derived['gateway_chunks_per_s']:.0f})"
    )
    goal_cpu = None
    if "gateway_cpu_ms_per_request" in derived:
        cpu_ms = derived["gateway_cpu_ms_per_request"]
        goal_cpu = cpu_ms is not None and cpu_ms < GOAL_GATEWAY_CPU_MS_PER_REQUEST
        print(
            f"goal 'under {GOAL_GATEWAY_CPU_MS_PER_REQUEST} ms gateway CPU per request' "
            f"(1-token requests): {'MET' if goal_cpu else 'NOT MET'} ({cpu_ms} ms)"
        )
    print(f"checks: {checks}")
    if not disturbance.clean:
        print(
            "WARNING: something else shared the machine (a pytest run, or more than "
            f"{gw.OTHER_CORES_LIMIT} other cores busy): {checks.get('disturbance')}"
        )
    payload = {
        "benchmark": NAME,
        "params": {
            "streams": args.streams,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "short_requests": args.short_requests,
            "short_concurrency": args.short_concurrency,
            "engine": "null",
            "throttle": "redis" if args.redis else "in-process",
            "redis_url": gw.REDIS_URL if args.redis else None,
            "key": key_info,
            "env_overridden_by_caller": overridden,
        },
        "environment": common.environment(args),
        "results": results,
        "derived": derived,
        "goal": {
            "chunks_per_s_at_least": GOAL_CHUNKS_PER_S,
            "gateway_cpu_ms_per_request_below": GOAL_GATEWAY_CPU_MS_PER_REQUEST,
            "chunks_met": goal_chunks,
            "cpu_met": goal_cpu,
        },
        "checks": checks,
    }
    print(f"\nresults: {common.write_json(name, args, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

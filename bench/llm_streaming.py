"""LlmService.Generate streaming rate: gRPC chunks/s the llm service sustains,
on the zero-cost null engine (each chunk carries one token), straight to the
llm service's port and through Envoy.

    .venv/bin/python bench/llm_streaming.py [--streams 16] [--tokens 2000] [--rounds 4]

Starts its own mesh (registry + llm + Envoy) with MLMESH_LLM_ENGINE=null, so
what is measured is the service itself (servicer, interceptors, grpc.aio
streaming), Envoy, and the Python client, not a model. After a warm-up, each
of --rounds rounds runs one burst per target, order alternating (envoy,
direct / direct, envoy / ...); a burst is --streams concurrent Generate
streams of --tokens tokens each on one grpc.aio channel per target.

Reports per target: chunks/s (response messages over the bursts' time),
stream-duration p50/max, and CPU microseconds per chunk of the client, Envoy
and the llm process (from /proc/<pid>/stat, 10 ms resolution), plus the
envoy/direct ratio. Writes bench/results/llm_streaming.json.
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
import grpc
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.llm.v1 import llm_pb2, llm_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as rpc

NAME = "llm_streaming"
MODEL = model_reference_pb2.ModelReference(model="tiny-llama", alias="champion")
CALL_TIMEOUT = 120.0
TARGETS = ("direct", "envoy")
PROMPT = "The model serves tokens fast"


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
        help="bursts per target; targets alternate order each round (default 4)",
    )
    common.add_common_args(parser)
    args = parser.parse_args()
    if min(args.streams, args.tokens, args.rounds) < 1:
        parser.error("--streams, --tokens and --rounds must be >= 1")
    if args.tokens > 4000:
        parser.error("--tokens above the null engine's 4096-token context minus the prompt")
    return args


class Burst:
    def __init__(self) -> None:
        self.chunks = 0
        self.tokens = 0
        self.streams_ok = 0
        self.bad_streams = 0  # wrong token count, usage or finish reason
        self.durations: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.seconds = 0.0

    async def run(self, stub: Any, streams: int, tokens: int) -> None:
        request = rpc.GenerateRequest(
            model=MODEL, text=PROMPT, sampling=llm_pb2.SamplingParams(max_tokens=tokens)
        )

        async def one() -> None:
            chunks = count = 0
            final = None
            started = time.perf_counter()
            try:
                async for chunk in stub.Generate(request, timeout=CALL_TIMEOUT):
                    chunks += 1
                    count += chunk.token_count
                    if chunk.finish_reason:
                        final = chunk
            except grpc.aio.AioRpcError as error:
                self.errors[error.code().name] += 1
                return
            finally:
                self.chunks += chunks
                self.tokens += count
            self.durations.append(time.perf_counter() - started)
            self.streams_ok += 1
            if (
                count != tokens
                or final is None
                or final.finish_reason != llm_pb2.FINISH_REASON_LENGTH
                or final.usage.completion_tokens != tokens
            ):
                self.bad_streams += 1

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(streams)))
        self.seconds += time.perf_counter() - started


def summarize(burst: Burst, cpu: dict[str, float]) -> dict[str, Any]:
    durations = sorted(burst.durations)
    return {
        "streams_ok": burst.streams_ok,
        "bad_streams": burst.bad_streams,
        "errors": dict(burst.errors),
        "chunks": burst.chunks,
        "tokens": burst.tokens,
        "seconds": round(burst.seconds, 3),
        "chunks_per_s": burst.chunks / burst.seconds if burst.seconds else float("nan"),
        "stream_p50_s": common.percentile(durations, 50),
        "stream_max_s": durations[-1] if durations else float("nan"),
        "cpu_seconds": cpu,
        "cpu_us_per_chunk": {
            k: round(v / burst.chunks * 1e6, 2) if burst.chunks else None for k, v in cpu.items()
        },
    }


async def main(args: argparse.Namespace) -> int:
    overridden = sorted(k for k in os.environ if k.startswith("MLMESH_LLM_"))
    os.environ["MLMESH_LLM_ENGINE"] = "null"
    results: dict[str, Any] = {}
    async with common.running_mesh(args, ("registry", "llm")) as (mesh, ready, _workdir):
        targets = {
            "envoy": ready["address"],
            "direct": f"127.0.0.1:{ready['services']['llm']['port']}",
        }
        print(
            f"envoy {targets['envoy']} (--concurrency {args.envoy_concurrency}), "
            f"direct {targets['direct']}; null engine; {args.rounds} bursts per target of "
            f"{args.streams} streams x {args.tokens} tokens",
            flush=True,
        )
        pids = common.mesh_pids(mesh)
        meter = common.CpuMeter(pids)
        async with (
            common.channel(targets["envoy"], api_key=mesh.admin_key()) as envoy_ch,
            common.channel(targets["direct"], api_key=mesh.admin_key()) as direct_ch,
        ):
            stubs = {
                "envoy": llm_service_pb2_grpc.LlmServiceStub(envoy_ch),
                "direct": llm_service_pb2_grpc.LlmServiceStub(direct_ch),
            }
            check = await stubs["direct"].GetModel(rpc.GetModelRequest(model=MODEL))
            if check.model.engine != "null":
                raise RuntimeError(f"the llm service runs engine {check.model.engine!r}, not null")
            for name in TARGETS:
                warm = Burst()
                await warm.run(stubs[name], args.streams, min(args.tokens, 500))
                if warm.errors:
                    print(f"  warm-up {name}: errors {dict(warm.errors)}")
            bursts = {name: Burst() for name in TARGETS}
            cpu: dict[str, dict[str, float]] = {name: {} for name in TARGETS}
            for r in range(args.rounds):
                order = TARGETS if r % 2 == 0 else TARGETS[::-1]
                for name in order:
                    before = meter.sample()
                    await bursts[name].run(stubs[name], args.streams, args.tokens)
                    for key, value in meter.delta(before, meter.sample()).items():
                        cpu[name][key] = round(cpu[name].get(key, 0.0) + value, 3)
            results = {name: summarize(bursts[name], cpu[name]) for name in TARGETS}

    rows = []
    for name in TARGETS:
        s = results[name]
        per = s["cpu_us_per_chunk"]
        busy = {k: v / s["seconds"] for k, v in s["cpu_seconds"].items()}
        rows.append(
            [
                name,
                s["streams_ok"],
                sum(s["errors"].values()) + s["bad_streams"],
                s["chunks"],
                s["chunks_per_s"],
                s["stream_p50_s"],
                per.get("client"),
                per.get("envoy"),
                per.get("llm"),
                f"{busy.get('llm', float('nan')):.2f}",
                f"{busy.get('client', float('nan')):.2f}",
            ]
        )
    ratio = results["envoy"]["chunks_per_s"] / results["direct"]["chunks_per_s"]
    print()
    print(
        f"Generate streaming, null engine, {args.streams} streams x {args.tokens} tokens, "
        f"{args.rounds} bursts per target: chunks/s, CPU us per chunk, cores busy"
    )
    print(
        common.table(
            [
                "target",
                "streams",
                "bad",
                "chunks",
                "chunks/s",
                "stream p50 s",
                "cpu client",
                "cpu envoy",
                "cpu llm",
                "llm cores",
                "client cores",
            ],
            rows,
        )
    )
    print(f"\nenvoy/direct chunks/s: {ratio:.3f}")
    payload = {
        "benchmark": NAME,
        "params": {
            "streams": args.streams,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "engine": "null",
            "llm_env_overridden_by_caller": overridden,
        },
        "environment": common.environment(args),
        "results": results,
        "derived": {"chunks_per_s_ratio_envoy_over_direct": ratio},
    }
    print(f"\nresults: {common.write_json(NAME, args, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

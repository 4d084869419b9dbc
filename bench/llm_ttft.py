"""LlmService.Generate time to first token, through Envoy and straight to the
llm service's port, on the CPU engine with the tiny model.

    .venv/bin/python bench/llm_ttft.py [--concurrency 1,32] [--max-tokens 32] \
        [--factor 8] [--min-requests 48] [--rounds 4]

Starts its own mesh (registry + llm + Envoy; the llm service builds the tiny
model and serves tiny-llama@champion) with MLMESH_LLM_ENGINE=cpu, then per
concurrency level c: a warm-up, then max(--min-requests, --factor x c)
requests per target in --rounds rounds; each round runs both targets back to
back and the order alternates (envoy, direct / direct, envoy / ...). One
grpc.aio channel per target; concurrency c = c asyncio tasks, each starting
its next request when the previous stream ended. Requests are greedy
(temperature 0), --max-tokens output tokens each, distinct prompts.

Time to first token is client-measured: from the call's start to the first
chunk with text or a token count. Also reported: the server's own
time_to_first_token (from the final chunk's timings), output tokens/s over
the bursts' time, and the Envoy-added p50 (envoy - direct). Writes
bench/results/llm_ttft.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sys
import time
from typing import Any

import _common as common
import grpc
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.llm.v1 import llm_pb2, llm_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as rpc
from mlmesh_llm.tiny_model import WORDS

NAME = "llm_ttft"
MODEL = model_reference_pb2.ModelReference(model="tiny-llama", alias="champion")
CALL_TIMEOUT = 60.0
TARGETS = ("envoy", "direct")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--concurrency", default="1,32", help="comma-separated concurrency levels (default 1,32)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="output tokens per request (default 32)"
    )
    parser.add_argument(
        "--factor",
        type=int,
        default=8,
        help="measured requests per target and level = factor x concurrency (default 8)",
    )
    parser.add_argument(
        "--min-requests",
        type=int,
        default=48,
        help="at least this many measured requests per target and level (default 48)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds per level; targets alternate order each round (default 4)",
    )
    parser.add_argument(
        "--max-running",
        type=int,
        default=32,
        help="MLMESH_LLM_MAX_RUNNING, the engine's batch slots (default 32)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="MLMESH_LLM_TORCH_THREADS (default 0: torch's default)",
    )
    common.add_common_args(parser)
    args = parser.parse_args()
    try:
        args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        parser.error("--concurrency must be comma-separated integers")
    if not args.levels or min(args.levels) < 1 or args.rounds < 1 or args.max_tokens < 1:
        parser.error("concurrency levels, --rounds and --max-tokens must be >= 1")
    return args


class Prompts:
    """An endless supply of distinct short prompts (4 to 12 corpus words)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.n = 0

    def next(self) -> str:
        self.n += 1
        words = [self.rng.choice(WORDS) for _ in range(self.rng.randint(4, 12))]
        return f"{' '.join(words).capitalize()} {self.n}"


class Burst:
    """`total` streams spread over `concurrency` closed-loop tasks."""

    def __init__(self) -> None:
        self.ttft: list[float] = []  # seconds, client-measured
        self.server_ttft: list[float] = []
        self.tokens = 0
        self.short = 0  # streams that ended before max_tokens (EOS)
        self.usage_mismatches = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.seconds = 0.0

    async def run(
        self, stub: Any, prompts: Prompts, total: int, concurrency: int, max_tokens: int
    ) -> None:
        remaining = total
        sampling = llm_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                request = rpc.GenerateRequest(model=MODEL, text=prompts.next(), sampling=sampling)
                tokens, first, final = 0, None, None
                started = time.perf_counter()
                try:
                    async for chunk in stub.Generate(request, timeout=CALL_TIMEOUT):
                        if first is None and (chunk.text or chunk.token_count):
                            first = time.perf_counter() - started
                        tokens += chunk.token_count
                        if chunk.finish_reason:
                            final = chunk
                except grpc.aio.AioRpcError as error:
                    self.errors[error.code().name] += 1
                    continue
                if first is None or final is None:
                    self.errors["NO_TOKENS_OR_FINAL"] += 1
                    continue
                self.ttft.append(first)
                self.server_ttft.append(final.timings.time_to_first_token.ToNanoseconds() / 1e9)
                self.tokens += tokens
                self.short += tokens < max_tokens
                self.usage_mismatches += final.usage.completion_tokens != tokens

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
        self.seconds += time.perf_counter() - started


def summarize(burst: Burst, cpu: dict[str, float]) -> dict[str, Any]:
    ms = sorted(v * 1e3 for v in burst.ttft)
    server_ms = sorted(v * 1e3 for v in burst.server_ttft)
    done = len(ms)
    return {
        "ok": done,
        "errors": dict(burst.errors),
        "short_streams": burst.short,
        "usage_mismatches": burst.usage_mismatches,
        "seconds": round(burst.seconds, 3),
        "tokens": burst.tokens,
        "tokens_per_s": burst.tokens / burst.seconds if burst.seconds else float("nan"),
        "ttft_p50_ms": common.percentile(ms, 50),
        "ttft_p90_ms": common.percentile(ms, 90),
        "ttft_p99_ms": common.percentile(ms, 99),
        "ttft_max_ms": ms[-1] if ms else float("nan"),
        "server_ttft_p50_ms": common.percentile(server_ms, 50),
        "server_ttft_p99_ms": common.percentile(server_ms, 99),
        "cpu_seconds": cpu,
        "cpu_us_per_token": {
            k: round(v / burst.tokens * 1e6, 1) if burst.tokens else None for k, v in cpu.items()
        },
    }


async def main(args: argparse.Namespace) -> int:
    overridden = sorted(k for k in os.environ if k.startswith("MLMESH_LLM_"))
    os.environ["MLMESH_LLM_ENGINE"] = "cpu"
    os.environ["MLMESH_LLM_MAX_RUNNING"] = str(args.max_running)
    os.environ["MLMESH_LLM_TORCH_THREADS"] = str(args.torch_threads)
    results: dict[int, dict[str, Any]] = {}
    prompts = Prompts()
    async with common.running_mesh(args, ("registry", "llm")) as (mesh, ready, _workdir):
        targets = {
            "envoy": ready["address"],
            "direct": f"127.0.0.1:{ready['services']['llm']['port']}",
        }
        print(
            f"envoy {targets['envoy']} (--concurrency {args.envoy_concurrency}), "
            f"direct {targets['direct']}; cpu engine, max_running {args.max_running}, "
            f"torch threads {args.torch_threads or 'default'}; {args.max_tokens} tokens/request",
            flush=True,
        )
        meter = common.CpuMeter(common.mesh_pids(mesh))
        async with (
            common.channel(targets["envoy"], api_key=mesh.admin_key()) as envoy_ch,
            common.channel(targets["direct"], api_key=mesh.admin_key()) as direct_ch,
        ):
            stubs = {
                "envoy": llm_service_pb2_grpc.LlmServiceStub(envoy_ch),
                "direct": llm_service_pb2_grpc.LlmServiceStub(direct_ch),
            }
            for level in args.levels:
                total = max(args.min_requests, args.factor * level)
                for name in TARGETS:
                    warm = Burst()
                    await warm.run(stubs[name], prompts, max(4, level), level, args.max_tokens)
                    if warm.errors:
                        print(f"  warm-up {name} c={level}: errors {dict(warm.errors)}")
                bursts = {name: Burst() for name in TARGETS}
                cpu: dict[str, dict[str, float]] = {name: {} for name in TARGETS}
                rounds = min(args.rounds, total)
                for r in range(rounds):
                    count = total // rounds + (1 if r < total % rounds else 0)
                    order = TARGETS if r % 2 == 0 else TARGETS[::-1]
                    for name in order:
                        before = meter.sample()
                        await bursts[name].run(stubs[name], prompts, count, level, args.max_tokens)
                        for key, value in meter.delta(before, meter.sample()).items():
                            cpu[name][key] = round(cpu[name].get(key, 0.0) + value, 3)
                results[level] = {name: summarize(bursts[name], cpu[name]) for name in TARGETS}
                e, d = results[level]["envoy"], results[level]["direct"]
                print(
                    f"  c={level:<3d} envoy ttft p50 {e['ttft_p50_ms']:.2f} ms "
                    f"{e['tokens_per_s']:6.0f} tok/s | direct ttft p50 {d['ttft_p50_ms']:.2f} ms "
                    f"{d['tokens_per_s']:6.0f} tok/s",
                    flush=True,
                )

    rows, derived = [], {}
    for level, by_target in results.items():
        for name in TARGETS:
            s = by_target[name]
            rows.append(
                [
                    f"c={level}",
                    name,
                    s["ok"],
                    sum(s["errors"].values()),
                    s["short_streams"],
                    s["ttft_p50_ms"],
                    s["ttft_p90_ms"],
                    s["ttft_p99_ms"],
                    s["server_ttft_p50_ms"],
                    s["tokens_per_s"],
                    s["cpu_us_per_token"].get("client"),
                    s["cpu_us_per_token"].get("envoy"),
                    s["cpu_us_per_token"].get("llm"),
                ]
            )
        e, d = by_target["envoy"], by_target["direct"]
        derived[level] = {
            "envoy_added_ttft_p50_ms": e["ttft_p50_ms"] - d["ttft_p50_ms"],
            "envoy_added_ttft_p99_ms": e["ttft_p99_ms"] - d["ttft_p99_ms"],
            "tokens_per_s_ratio_envoy_over_direct": e["tokens_per_s"] / d["tokens_per_s"],
        }
    print()
    print(
        f"Generate (cpu engine, tiny-llama, greedy, {args.max_tokens} tokens): time to first "
        "token ms (client; server = the service's own), output tokens/s, CPU us per token"
    )
    print(
        common.table(
            [
                "level",
                "target",
                "ok",
                "err",
                "short",
                "ttft p50",
                "ttft p90",
                "ttft p99",
                "server p50",
                "tok/s",
                "cpu client",
                "cpu envoy",
                "cpu llm",
            ],
            rows,
        )
    )
    print()
    print(
        common.table(
            ["level", "envoy-added ttft p50 ms", "envoy-added ttft p99 ms", "envoy/direct tok/s"],
            [
                [
                    f"c={lvl}",
                    v["envoy_added_ttft_p50_ms"],
                    v["envoy_added_ttft_p99_ms"],
                    v["tokens_per_s_ratio_envoy_over_direct"],
                ]
                for lvl, v in derived.items()
            ],
        )
    )
    payload = {
        "benchmark": NAME,
        "params": {
            "levels": args.levels,
            "max_tokens": args.max_tokens,
            "factor": args.factor,
            "min_requests": args.min_requests,
            "rounds": args.rounds,
            "max_running": args.max_running,
            "torch_threads": args.torch_threads,
            "llm_env_overridden_by_caller": overridden,
        },
        "environment": common.environment(args),
        "results": {str(k): v for k, v in results.items()},
        "derived": {str(k): v for k, v in derived.items()},
    }
    print(f"\nresults: {common.write_json(NAME, args, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

"""What the gateway adds over calling the backend directly, in one run:
unary Infer on digits (1 x 64 FP32) and Generate time to first token, each
through Envoy + the gateway (with an API key) and straight to the backend.

    .venv/bin/python bench/gateway_overhead.py [--redis] [--concurrency 1,32] \
        [--infer-requests 2000] [--generate-factor 8] [--generate-min 64] \
        [--max-tokens 4] [--llm-engine cpu] [--key limited] [--rounds 4]

Starts its own mesh (registry + llm + Triton + deployer + gateway + Envoy; the
deployer serves digits@champion on Triton, the llm service tiny-llama@champion)
in a temporary state directory. The gateway path is the whole production
path: Envoy's route (no key check in Envoy: every service checks its
callers itself, in process), the gateway's key check, throttle admit (settle for streams;
in-process, or Redis database 15 with --redis: flushed before and after,
and checked to hold the throttle's keys afterwards), the
usage ledger write (SQLite), and for Generate the CountTokens round trip to
the llm service before the stream. "direct" is the same backend call without
any of that (but the llm's own key check of the caller, as on the gateway's
hop to it): Infer with mlmesh_inference.triton.TritonClient (the client the
gateway itself uses) at Triton's port, Generate with LlmService/Generate at
the llm port.

The key (--key limited, the default) is created through KeyService with the
GENERATE and INFER scopes, model pattern `*` and limits far above what the
run uses (requests and tokens per minute, concurrent streams), so every
throttle check runs as it does for a real caller; --key admin uses the
bootstrap admin key instead (an ADMIN key: scope checks short-circuit, no
limits). The key goes on each call as `authorization: Bearer ...` metadata on
a plain grpc.aio channel (no client interceptors, so the client's own cost is
alike on both paths).

Per concurrency level: a warm-up per scenario and target, then per scenario
the measured calls in --rounds rounds, the gateway/direct order alternating
each round. Infer: --infer-requests calls per target; every answer's argmax
is checked against a batched reference pass. Generate: max(--generate-min,
--generate-factor x c) streams per target of --max-tokens tokens (greedy,
distinct prompts); time to first token is client-measured (call start to the
first chunk with text or tokens). One channel per target; concurrency c = c
closed-loop asyncio tasks.

Prints p50/p90/p99 (ms), requests/s, CPU microseconds per request of the
client, Envoy, the gateway and the backend (llm, or tritonserver + the
digits python stub), then the gateway-added p50/p99 (gateway - direct) and
the gateway/direct requests/s ratio against the aim (under 1 ms added at p50,
at least half the direct throughput). Writes bench/results/gateway_overhead.json
(gateway_overhead_redis.json with --redis).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from typing import Any

import _common as common
import _gateway as gw
import _triton as tb
import numpy as np
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.llm.v1 import llm_pb2, llm_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_inference.triton import TritonClient
from mlmesh_llm.tiny_model import WORDS
from mlmesh_triton.build import digits_training_data

NAME = "gateway_overhead"
SERVICES = ("registry", "llm", "triton", "deployer", "gateway")
LLM_MODEL = model_reference_pb2.ModelReference(model="tiny-llama", alias="champion")
DIGITS = "digits"
TARGETS = ("gateway", "direct")
SCENARIOS = ("infer", "generate")
GOAL_ADDED_P50_MS = 1.0
GOAL_RPS_RATIO = 0.5
CALL_TIMEOUT = 60.0


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--concurrency", default="1,32", help="comma-separated concurrency levels (default 1,32)"
    )
    parser.add_argument(
        "--infer-requests",
        type=int,
        default=2000,
        help="measured Infer calls per target and level (default 2000)",
    )
    parser.add_argument(
        "--infer-warmup", type=int, default=200, help="Infer warm-up calls per target (default 200)"
    )
    parser.add_argument(
        "--generate-factor",
        type=int,
        default=8,
        help="measured Generate streams per target and level = factor x c (default 8)",
    )
    parser.add_argument(
        "--generate-min",
        type=int,
        default=64,
        help="at least this many Generate streams per target and level (default 64)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=4, help="tokens per Generate stream (default 4)"
    )
    parser.add_argument(
        "--llm-engine",
        choices=("vllm", "cpu", "null"),
        default="cpu",
        help="MLMESH_LLM_ENGINE: vllm (vLLM's CPU build, from .envs/llm), cpu (our CPU "
        "engine) or null (zero-cost tokens); tiny-llama in the first two",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="MLMESH_LLM_TORCH_THREADS for the cpu engine (default 1: best on 2 cores)",
    )
    gw.add_gateway_args(parser)
    parser.add_argument(
        "--scenarios", default="infer,generate", help="which to measure (default infer,generate)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds per level and scenario; targets alternate order each round (default 4)",
    )
    common.add_common_args(parser)
    args = parser.parse_args()
    try:
        args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        parser.error("--concurrency must be comma-separated integers")
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenario_list or set(args.scenario_list) - set(SCENARIOS):
        parser.error(f"--scenarios must name some of {', '.join(SCENARIOS)}")
    if not args.levels or min(args.levels) < 1 or args.rounds < 1 or args.max_tokens < 1:
        parser.error("concurrency levels, --rounds and --max-tokens must be >= 1")
    if min(args.infer_requests, args.generate_min) < args.rounds:
        parser.error("--infer-requests and --generate-min must be >= --rounds")
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


class Digits:
    """Rows of the digits data, the gateway request for each, the expected argmax."""

    def __init__(self) -> None:
        x, _labels = digits_training_data()
        self.x = x
        self.rows = [x[i : i + 1].copy() for i in range(len(x))]
        self.expected: np.ndarray | None = None

    def row(self, i: int) -> np.ndarray:
        return self.rows[i % len(self.rows)]

    def gateway_request(self, i: int) -> rpc.InferRequest:
        return rpc.InferRequest(
            model=model_reference_pb2.ModelReference(model=DIGITS),
            inputs=[
                gateway_pb2.InferTensor(
                    name="pixels",
                    datatype="FP32",
                    shape=[1, 64],
                    raw_contents=self.row(i).tobytes(),
                )
            ],
        )

    def check(self, i: int, probabilities: np.ndarray) -> str | None:
        if probabilities.shape != (1, 10):
            return f"shape {list(probabilities.shape)}"
        assert self.expected is not None
        if int(probabilities[0].argmax()) != int(self.expected[i % len(self.rows)]):
            return "argmax"
        return None


async def reference(client: TritonClient, digits: Digits) -> float:
    """Expected argmax per row from batched direct calls; returns train accuracy."""
    parts = []
    for start in range(0, len(digits.x), 64):
        result = await client.infer(DIGITS, {"pixels": digits.x[start : start + 64]})
        parts.append(result.outputs["probabilities"])
    probabilities = np.concatenate(parts)
    digits.expected = probabilities.argmax(axis=1)
    _x, labels = digits_training_data()
    return float((digits.expected == labels).mean())


class GenerateBurst(tb.Burst):
    """tb.Burst whose latencies are the streams' times to first token."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = 0


def infer_callers(
    gateway: Any, triton: TritonClient, digits: Digits, metadata: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    async def via_gateway(i: int) -> str | None:
        reply = await gateway.Infer(
            digits.gateway_request(i), metadata=metadata, timeout=CALL_TIMEOUT
        )
        out = {t.name: t for t in reply.outputs}.get("probabilities")
        if out is None:
            return "no probabilities"
        array = np.frombuffer(out.raw_contents, dtype=np.float32).reshape(tuple(out.shape))
        return digits.check(i, array)

    async def direct(i: int) -> str | None:
        result = await triton.infer(DIGITS, {"pixels": digits.row(i)})
        return digits.check(i, result.outputs["probabilities"])

    return {"gateway": via_gateway, "direct": direct}


async def run_generate(
    burst: GenerateBurst,
    target: str,
    stubs: dict[str, Any],
    metadata: tuple[tuple[str, str], ...],
    prompts: Prompts,
    total: int,
    concurrency: int,
    max_tokens: int,
) -> None:
    """Closed-loop Generate streams; burst.latencies are TTFTs in ns."""
    sampling = llm_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            inner = llm_rpc.GenerateRequest(model=LLM_MODEL, text=prompts.next(), sampling=sampling)
            first = None
            tokens = 0
            final = None
            started = time.perf_counter_ns()
            try:
                if target == "gateway":
                    call = stubs["gateway"].Generate(
                        rpc.GenerateRequest(region="local", request=inner),
                        metadata=metadata,
                        timeout=CALL_TIMEOUT,
                    )
                    async for message in call:
                        chunk = message.response
                        if first is None and (chunk.text or chunk.token_count):
                            first = time.perf_counter_ns() - started
                        tokens += chunk.token_count
                        if chunk.finish_reason:
                            final = chunk
                else:
                    # The llm checks its callers too: the admin key (the
                    # gateway uses its own service key), as metadata like the
                    # gateway path's key.
                    async for chunk in stubs["llm"].Generate(
                        inner, metadata=stubs["llm_metadata"], timeout=CALL_TIMEOUT
                    ):
                        if first is None and (chunk.text or chunk.token_count):
                            first = time.perf_counter_ns() - started
                        tokens += chunk.token_count
                        if chunk.finish_reason:
                            final = chunk
            except Exception as error:  # counted, not fatal
                burst.errors[type(error).__name__] += 1
                burst.first_error = burst.first_error or f"{type(error).__name__}: {error}"
                continue
            if first is None or final is None:
                burst.wrong["no tokens or final"] += 1
                continue
            burst.latencies.append(first)
            burst.tokens += tokens
            if final.usage.completion_tokens != tokens:
                burst.wrong["usage"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    burst.seconds += time.perf_counter() - started


def add_cpu(total: dict[str, float], delta: dict[str, float]) -> None:
    for key, value in delta.items():
        total[key] = round(total.get(key, 0.0) + value, 3)


def summarize(burst: tb.Burst, cpu: dict[str, float]) -> dict[str, Any]:
    summary = tb.summarize(burst, cpu)
    summary["other_cores"] = gw.other_cores(cpu, burst.seconds)
    if isinstance(burst, GenerateBurst):
        summary["tokens"] = burst.tokens
    return summary


async def main(args: argparse.Namespace) -> int:
    overridden = sorted(k for k in os.environ if k.startswith(("MLMESH_LLM_", "MLMESH_GATEWAY_")))
    os.environ["MLMESH_LLM_ENGINE"] = args.llm_engine
    os.environ["MLMESH_LLM_TORCH_THREADS"] = str(args.torch_threads)
    gw.configure_throttle(args.redis)
    name = NAME + ("_redis" if args.redis else "")
    results: dict[int, dict[str, dict[str, Any]]] = {}
    checks: dict[str, Any] = {}
    prompts = Prompts()
    digits = Digits()
    calls_made = {"infer": 0, "generate": 0}
    disturbance = gw.DisturbanceLog()
    try:
        async with common.running_mesh(args, SERVICES) as (mesh, ready, workdir):
            services = ready["services"]
            envoy = ready["address"]
            triton_url = f"127.0.0.1:{services['triton']['port']}"
            llm_url = f"127.0.0.1:{services['llm']['port']}"
            admin_key = mesh.admin_key()
            if not admin_key:
                raise RuntimeError("the gateway wrote no admin key")
            repository = workdir / "state" / "triton-repository"
            async with (
                common.channel(envoy) as envoy_ch,
                common.channel(llm_url) as llm_ch,
                TritonClient(triton_url, timeout_s=tb.CALL_TIMEOUT) as triton,
            ):
                secret, key_info = await gw.make_key(envoy_ch, admin_key, args.key)
                metadata = (("authorization", f"Bearer {secret}"),)
                await tb.wait_ready(triton, DIGITS, 120)
                checks["digits_train_accuracy"] = await reference(triton, digits)
                llm_stub = llm_service_pb2_grpc.LlmServiceStub(llm_ch)
                llm_metadata = (("authorization", f"Bearer {admin_key}"),)
                model = await llm_stub.GetModel(
                    llm_rpc.GetModelRequest(model=LLM_MODEL), metadata=llm_metadata
                )
                checks["llm_engine"] = model.model.engine
                if model.model.engine != args.llm_engine:
                    raise RuntimeError(
                        f"the llm service runs engine {model.model.engine!r}, "
                        f"not {args.llm_engine!r}"
                    )
                stubs = {
                    "gateway": gateway_service_pb2_grpc.GatewayServiceStub(envoy_ch),
                    "llm": llm_stub,
                    "llm_metadata": llm_metadata,
                }
                infer_calls = infer_callers(stubs["gateway"], triton, digits, metadata)
                meter = tb.meter_for(mesh, repository, (DIGITS,))
                if args.redis and (pid := gw.redis_pid()):
                    meter.pids["redis"] = pid  # Redis's own CPU (JSON only)
                checks["ledger_before"] = gw.ledger_rows(workdir / "state")
                print(
                    f"envoy {envoy} (--concurrency {args.envoy_concurrency}), triton "
                    f"{triton_url}, llm {llm_url} ({args.llm_engine} engine); throttle "
                    f"{'redis ' + gw.REDIS_URL if args.redis else 'in-process'}; key {args.key}; "
                    f"{args.rounds} rounds per level, scenarios {', '.join(args.scenario_list)}",
                    flush=True,
                )
                index = 0
                for level in args.levels:
                    gen_total = max(args.generate_min, args.generate_factor * level)
                    # Warm-up: every scenario and target (channels, caches, engine).
                    for scenario in args.scenario_list:
                        for target in TARGETS:
                            warm: tb.Burst
                            if scenario == "infer":
                                warm = tb.Burst()
                                await warm.run(infer_calls[target], args.infer_warmup, level, index)
                                index += args.infer_warmup
                                calls_made["infer"] += args.infer_warmup * (target == "gateway")
                            else:
                                warm = GenerateBurst()
                                count = max(8, level)
                                await run_generate(
                                    warm,
                                    target,
                                    stubs,
                                    metadata,
                                    prompts,
                                    count,
                                    level,
                                    args.max_tokens,
                                )
                                calls_made["generate"] += count * (target == "gateway")
                            if warm.errors or warm.wrong:
                                print(
                                    f"  warm-up {scenario}/{target} c={level}: errors "
                                    f"{dict(warm.errors)} wrong {dict(warm.wrong)} "
                                    f"{warm.first_error}",
                                    flush=True,
                                )
                    results[level] = {}
                    for scenario in args.scenario_list:
                        total = args.infer_requests if scenario == "infer" else gen_total
                        bursts: dict[str, tb.Burst] = {
                            t: (tb.Burst() if scenario == "infer" else GenerateBurst())
                            for t in TARGETS
                        }
                        cpu: dict[str, dict[str, float]] = {t: {} for t in TARGETS}
                        for r in range(args.rounds):
                            count = total // args.rounds + (1 if r < total % args.rounds else 0)
                            for target in TARGETS if r % 2 == 0 else TARGETS[::-1]:
                                disturbance.check()
                                before = meter.sample()
                                if scenario == "infer":
                                    await bursts[target].run(
                                        infer_calls[target], count, level, index
                                    )
                                    index += count
                                else:
                                    await run_generate(
                                        bursts[target],  # type: ignore[arg-type]
                                        target,
                                        stubs,
                                        metadata,
                                        prompts,
                                        count,
                                        level,
                                        args.max_tokens,
                                    )
                                add_cpu(cpu[target], meter.delta(before, meter.sample()))
                                calls_made[scenario] += count * (target == "gateway")
                        results[level][scenario] = {
                            t: summarize(bursts[t], cpu[t]) for t in TARGETS
                        }
                        g, d = (
                            results[level][scenario]["gateway"],
                            results[level][scenario]["direct"],
                        )
                        print(
                            f"  c={level:<3d} {scenario:<8s} gateway p50 {g['p50_ms']:.3f} ms "
                            f"{g['rps']:6.0f}/s | direct p50 {d['p50_ms']:.3f} ms "
                            f"{d['rps']:6.0f}/s",
                            flush=True,
                        )
                disturbance.check()
                checks["disturbance"] = disturbance.report(
                    [s for by in results.values() for t in by.values() for s in t.values()]
                )
                await asyncio.sleep(0.5)  # the last ledger writes
                checks["gateway_calls_made"] = dict(calls_made)
                checks.update(gw.checks_after(workdir / "state", args.redis))
    finally:
        if args.redis:
            try:
                gw.flush_redis()
            except Exception as error:  # cleanup only
                print(f"warning: could not flush {gw.REDIS_URL}: {error}", file=sys.stderr)

    rows, derived = [], {}
    for level, by_scenario in results.items():
        for scenario, by_target in by_scenario.items():
            for target in TARGETS:
                s = by_target[target]
                cpu_us = s["cpu_us_per_request"]
                backend = (
                    (cpu_us.get("triton") or 0) + (cpu_us.get(f"stub:{DIGITS}") or 0)
                    if scenario == "infer"
                    else cpu_us.get("llm")
                )
                rows.append(
                    [
                        f"c={level}",
                        scenario,
                        target,
                        s["ok"],
                        sum(s["errors"].values()) + sum(s["wrong"].values()),
                        s["p50_ms"],
                        s["p90_ms"],
                        s["p99_ms"],
                        s["rps"],
                        cpu_us.get("client"),
                        cpu_us.get("envoy"),
                        cpu_us.get("gateway"),
                        backend,
                        s["other_cores"],
                    ]
                )
            g, d = by_target["gateway"], by_target["direct"]
            derived[f"c={level}/{scenario}"] = {
                "level": level,
                "scenario": scenario,
                "gateway_added_p50_ms": g["p50_ms"] - d["p50_ms"],
                "gateway_added_p99_ms": g["p99_ms"] - d["p99_ms"],
                "gateway_added_mean_ms": g["mean_ms"] - d["mean_ms"],
                "rps_ratio_gateway_over_direct": g["rps"] / d["rps"] if d["rps"] else float("nan"),
                "gateway_cpu_us_per_request": g["cpu_us_per_request"].get("gateway"),
                "envoy_cpu_us_per_request": g["cpu_us_per_request"].get("envoy"),
            }
    print()
    print(
        f"Gateway overhead ({'redis' if args.redis else 'in-process'} throttle, key {args.key}): "
        f"Infer digits 1x64 latency / Generate ({args.llm_engine} engine, {args.max_tokens} "
        "tokens) time to first token, ms; requests/s; CPU us per request (backend = llm, "
        "or tritonserver + digits stub); other cores = what the rest of the machine kept busy"
    )
    print(
        common.table(
            [
                "level",
                "scenario",
                "target",
                "ok",
                "err",
                "p50",
                "p90",
                "p99",
                "req/s",
                "cpu client",
                "cpu envoy",
                "cpu gateway",
                "cpu backend",
                "other cores",
            ],
            rows,
        )
    )
    print()
    print(
        common.table(
            [
                "level",
                "scenario",
                "gw-added p50 ms",
                "gw-added p99 ms",
                "gw/direct req/s",
                "p50 < 1 ms",
                "req/s >= 0.5",
            ],
            [
                [
                    f"c={v['level']}",
                    v["scenario"],
                    v["gateway_added_p50_ms"],
                    v["gateway_added_p99_ms"],
                    v["rps_ratio_gateway_over_direct"],
                    "yes" if v["gateway_added_p50_ms"] < GOAL_ADDED_P50_MS else "NO",
                    "yes" if v["rps_ratio_gateway_over_direct"] >= GOAL_RPS_RATIO else "NO",
                ]
                for v in derived.values()
            ],
        )
    )
    print()
    print(f"checks: {checks}")
    if not disturbance.clean:
        print(
            "WARNING: something else shared the machine (a pytest run, or more than "
            f"{gw.OTHER_CORES_LIMIT} other cores busy): {checks.get('disturbance')}"
        )
    payload = {
        "benchmark": NAME,
        "params": {
            "levels": args.levels,
            "scenarios": args.scenario_list,
            "infer_requests": args.infer_requests,
            "infer_warmup": args.infer_warmup,
            "generate_factor": args.generate_factor,
            "generate_min": args.generate_min,
            "max_tokens": args.max_tokens,
            "llm_engine": args.llm_engine,
            "torch_threads": args.torch_threads,
            "rounds": args.rounds,
            "throttle": "redis" if args.redis else "in-process",
            "redis_url": gw.REDIS_URL if args.redis else None,
            "key": key_info,
            "env_overridden_by_caller": overridden,
        },
        "environment": common.environment(args),
        "results": {str(k): v for k, v in results.items()},
        "derived": derived,
        "goal": {
            "gateway_added_p50_ms_below": GOAL_ADDED_P50_MS,
            "rps_ratio_at_least": GOAL_RPS_RATIO,
        },
        "checks": checks,
    }
    print(f"\nresults: {common.write_json(name, args, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

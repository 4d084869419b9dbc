"""vLLM's CPU build, our CPU engine and sequential ``generate``, one run, one
model: output tokens/s and time to first token at several concurrencies,
engine start-up time and memory.

    .venv/bin/python bench/llm_engines.py [--levels 1,8,32,64] [--factor 4] \
        [--max-tokens 128] [--max-running 64] [--engines vllm,cpu,sequential]

Builds the tiny model (mlmesh_llm.tiny_model.build, default arguments: Llama,
4 layers, 256 wide, context 1024) once, then measures each engine in a
process of its own, one after another, so that none shares the CPU or the
memory with another:

- vllm: ``VllmEngine`` (vLLM's ``AsyncLLM``, the CPU build) on the llm's own
  environment's Python (.envs/llm), with the llm service's settings:
  ``max_num_seqs=--max-running``, KV cache 256 MiB, vLLM's defaults otherwise
  (torch.compile on), in float32 as the checkpoint and the CPU engine;
- vllm-auto: the same with vLLM's own dtype choice, as the service runs it
  (``dtype="auto"``: bfloat16 on this CPU);
  both with vLLM's thread binding (--threads-bind, default auto: the worker's
  thread pinned to the first core, the other core left to the frontend);
- cpu: ``CpuEngine(max_running=--max-running)`` on the services' Python;
- sequential: plain transformers ``model.generate`` serving one request at a
  time, on the services' Python.

Per level c: --factor x c requests (distinct prompts of 4-16 tokens, greedy,
--max-tokens output tokens each; the random-weight model rarely ends one
early, and the table's JSON counts those that did) from c closed-loop
clients. For sequential ``generate`` the clients queue for the one
model: its time to first token includes that wait, as a server that serves
one request at a time would give it. Time to first token is measured by the
client from the call to the first delta with a token.

Start-up: seconds from the engine's constructor to ready (vLLM: its spawned
engine-core and worker processes included) and the process tree's resident
memory (RSS, and PSS, which splits shared pages among the processes that map
them) once started. Results: bench/results/llm_engines.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
NAME = "llm_engines"
VLLM_PYTHON = ROOT / ".envs" / "llm" / "bin" / "python"
ENGINES = ("vllm", "vllm-auto", "cpu", "sequential")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="1,8,32,64", help="concurrencies (default 1,8,32,64)")
    parser.add_argument("--factor", type=int, default=4, help="requests per level = factor x c")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    parser.add_argument("--max-running", type=int, default=64, help="engines' batch slots")
    parser.add_argument("--engines", default=",".join(ENGINES), help="which, in order")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed")
    parser.add_argument("--output", type=Path, default=None, help="JSON results path")
    parser.add_argument("--max-seconds", type=float, default=1500.0, help="limit per engine")
    parser.add_argument(
        "--threads-bind",
        default="auto",
        help="VLLM_CPU_OMP_THREADS_BIND (default auto, vLLM's and the llm service's)",
    )
    # internal: run one engine in this process and print its JSON
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not args.levels or min(args.levels) < 1 or args.factor < 1 or args.max_tokens < 1:
        parser.error("levels, --factor and --max-tokens must be >= 1")
    if set(args.engines) - set(ENGINES):
        parser.error(f"--engines: choose from {ENGINES}")
    return args


# ---- measuring (stdlib only: runs on either environment's Python) ----------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile, as bench/_common.py's."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


def tree_memory_mib(pid: int) -> dict[str, float]:
    """RSS and PSS of the process tree, in MiB (smaps_rollup)."""
    total = {"rss_mib": 0.0, "pss_mib": 0.0, "processes": 0}
    for member in process_tree(pid):
        try:
            lines = Path(f"/proc/{member}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        fields = {line.split(":")[0]: line.split()[1] for line in lines[1:] if ":" in line}
        total["rss_mib"] += int(fields.get("Rss", 0)) / 1024
        total["pss_mib"] += int(fields.get("Pss", 0)) / 1024
        total["processes"] += 1
    return {k: round(v, 1) for k, v in total.items()}


def prompts(count: int, seed: int) -> list[str]:
    from mlmesh_llm.tiny_model import WORDS

    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))).capitalize()
        if text not in out:
            out.append(text)
    return out


def summary(
    tokens: list[int], ttft: list[float], seconds: float, max_tokens: int
) -> dict[str, Any]:
    ttft = sorted(ttft)
    return {
        "requests": len(tokens),
        "tokens": sum(tokens),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(sum(tokens) / seconds, 1),
        "short_requests": sum(1 for n in tokens if n < max_tokens),
        "ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 2),
        "ttft_p99_ms": round(percentile(ttft, 99) * 1e3, 2),
    }


async def engine_burst(engine: Any, texts: list[str], clients: int, max_tokens: int) -> dict:
    """Every text through ``engine`` from ``clients`` closed-loop tasks."""
    from mlmesh_llm.engines.base import EngineRequest, Sampling

    queue = list(enumerate(texts))
    tokens = [0] * len(texts)
    ttft: list[float] = []
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0)

    async def client() -> None:
        while queue:
            i, text = queue.pop(0)
            request = EngineRequest(f"r{i}", engine.tokenizer.encode(text), sampling)
            started = time.perf_counter()
            async for delta in engine.generate(request):
                if not tokens[i] and delta.token_count:
                    ttft.append(time.perf_counter() - started)
                tokens[i] += delta.token_count

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(clients, len(texts)))))
    return summary(tokens, ttft, time.perf_counter() - started, max_tokens)


async def sequential_burst(model: Any, tokenizer: Any, texts: list[str], clients: int, n: int):  # type: ignore[no-untyped-def]
    """Every text with plain greedy ``generate``, one at a time (a lock), from
    ``clients`` closed-loop tasks: the wait for the model counts in TTFT."""
    import torch

    lock = asyncio.Lock()
    queue = list(enumerate(texts))
    tokens = [0] * len(texts)
    ttft: list[float] = []

    def run(ids: Any, streamer: Any) -> Any:
        with torch.inference_mode():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
            )

    async def client() -> None:
        while queue:
            i, text = queue.pop(0)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            started = time.perf_counter()
            async with lock:
                streamer = _FirstToken()
                out = await asyncio.to_thread(run, ids, streamer)
                ttft.append(streamer.at - started)
                tokens[i] = int(out.shape[1] - ids.shape[1])

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(clients, len(texts)))))
    return summary(tokens, ttft, time.perf_counter() - started, n)


class _FirstToken:
    """A ``generate`` streamer that notes when the first new token came (its
    first ``put`` is the prompt, the second the first generated token)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at = 0.0

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        if not self.at:
            self.at = time.perf_counter()


async def child(args: argparse.Namespace) -> dict[str, Any]:
    """One engine, in this process: start-up, memory, every level."""
    texts = prompts(args.factor * max(args.levels), args.seed)
    result: dict[str, Any] = {"engine": args.child, "levels": {}}
    started = time.perf_counter()
    if args.child == "sequential":
        from mlmesh_llm.engines.hf import load_causal_lm

        model, tokenizer = await asyncio.to_thread(load_causal_lm, args.model_dir)
        engine = None
    elif args.child == "cpu":
        from mlmesh_llm.engines.cpu import CpuEngine

        engine = CpuEngine(
            args.model_dir, max_running=args.max_running, threads=max(1, (os.cpu_count() or 2) // 2)
        )
        await engine.start()
    else:
        from mlmesh_llm.engines.vllm import VllmEngine, VllmLimits

        options = {"dtype": "float32"} if args.child == "vllm" else {}
        engine = VllmEngine(args.model_dir, options, VllmLimits(max_running=args.max_running))
        await engine.start()
        result["vllm_dtype"] = str(engine._llm.model_config.dtype)
        result["vllm_compilation_mode"] = str(engine._llm.vllm_config.compilation_config.mode)
    result["startup_s"] = round(time.perf_counter() - started, 2)
    result["memory"] = tree_memory_mib(os.getpid())
    try:
        # Warm-up (unmeasured): first-call costs stay out of level 1.
        if engine is None:
            await sequential_burst(model, tokenizer, texts[:2], 1, 16)
        else:
            await engine_burst(engine, texts[:4], 4, 16)
        for level in args.levels:
            chosen = texts[: args.factor * level]
            if engine is None:
                r = await sequential_burst(model, tokenizer, chosen, level, args.max_tokens)
            else:
                r = await engine_burst(engine, chosen, level, args.max_tokens)
            result["levels"][str(level)] = r
            print(
                f"  {args.child:10s} c={level:<3d} {r['tokens_per_s']:7.0f} tok/s, "
                f"TTFT p50 {r['ttft_p50_ms']:7.1f} ms p99 {r['ttft_p99_ms']:7.1f} ms",
                file=sys.stderr,
                flush=True,
            )
        result["memory_after"] = tree_memory_mib(os.getpid())
    finally:
        if engine is not None:
            await engine.stop()
    return result


# ---- the run ---------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_child(engine: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    python = str(VLLM_PYTHON) if engine.startswith("vllm") else sys.executable
    result_file = model_dir.parent / f"{engine}.json"
    argv = [
        python,
        str(Path(__file__).resolve()),
        "--child",
        engine,
        "--model-dir",
        str(model_dir),
        "--levels",
        ",".join(map(str, args.levels)),
        "--factor",
        str(args.factor),
        "--max-tokens",
        str(args.max_tokens),
        "--max-running",
        str(args.max_running),
        "--seed",
        str(args.seed),
        "--result-file",
        str(result_file),
    ]
    env = {
        **os.environ,
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": args.threads_bind,
        "PYTHONWARNINGS": "ignore",
    }
    before = load_average()
    started = time.perf_counter()
    done = subprocess.run(
        argv,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=args.max_seconds,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{engine} failed ({done.returncode}):\n{done.stderr[-6000:]}")
    for line in done.stderr.splitlines():
        if line.startswith("  "):
            print(line, flush=True)
    result: dict[str, Any] = json.loads(result_file.read_text())
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_before"] = before
    result["load_average_after"] = load_average()
    return result


def table(results: dict[str, dict[str, Any]], levels: list[int]) -> str:
    rows = [
        "| engine | start-up s | RSS MiB (PSS) | "
        + " | ".join(f"c={c} tok/s | c={c} TTFT p50/p99 ms" for c in levels)
        + " |"
    ]
    rows.append("|" + "---|" * (3 + 2 * len(levels)))
    for name, r in results.items():
        cells = [
            name,
            f"{r['startup_s']:.1f}",
            f"{r['memory']['rss_mib']:.0f} ({r['memory']['pss_mib']:.0f})",
        ]
        for c in levels:
            level = r["levels"][str(c)]
            cells += [
                f"{level['tokens_per_s']:.0f}",
                f"{level['ttft_p50_ms']:.1f} / {level['ttft_p99_ms']:.1f}",
            ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    args = parse()
    if args.child:
        # vLLM logs on stdout: the result goes to a file of its own.
        args.result_file.write_text(json.dumps(asyncio.run(child(args))))
        return 0
    from mlmesh_llm.tiny_model import build

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mlmesh-bench-") as tmp:
        model_dir = build(Path(tmp) / "tiny-llama")
        for engine in args.engines:
            print(f"{engine}: starting (load average {load_average()})", flush=True)
            results[engine] = run_child(engine, model_dir, args)
    print()
    print(table(results, args.levels))
    for name in ("vllm", "vllm-auto"):
        if name not in results or "cpu" not in results:
            continue
        for c in args.levels:
            ratio = (
                results[name]["levels"][str(c)]["tokens_per_s"]
                / results["cpu"]["levels"][str(c)]["tokens_per_s"]
            )
            print(f"{name} / cpu tokens/s at c={c}: {ratio:.2f}x")
    import platform

    payload = {
        "benchmark": NAME,
        "params": {
            "levels": args.levels,
            "factor": args.factor,
            "max_tokens": args.max_tokens,
            "max_running": args.max_running,
            "seed": args.seed,
            "vllm_cpu_omp_threads_bind": args.threads_bind,
        },
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "results": results,
    }
    path = args.output or BENCH / "results" / f"{NAME}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

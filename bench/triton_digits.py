"""The digits classifier on Triton with dynamic batching on and off: latency
at concurrency 1 and requests/s at concurrency 32, single-row requests.

    .venv/bin/python bench/triton_digits.py [--requests 4000] [--warmup 200] \
        [--concurrency 1,32] [--rounds 4] [--clients mlmesh,raw] [--extra-delays 0,100]

Starts its own mesh (registry + Triton + deployer + Envoy; the deployer's
prepare step builds and registers digits@champion and minilm@champion, and the
deployer loads both on Triton) in a temporary state directory. Then copies
Triton's `digits` model directory to `digits-nobatch`, with the same weights
and version but a config.pbtxt without `dynamic_batching`, and loads it with
explicit model control, so "on" is `digits` as the deployer serves it and
"off" is `digits-nobatch`. --extra-delays N,... adds `digits-delay<N>` copies
with `dynamic_batching { max_queue_delay_microseconds: N }` (mode "delay<N>";
the deployer's digits uses 500). Triton's own view of every config is checked.

Every request is one row (1 x 64 FP32) of scikit-learn's digits data, and
every answer's argmax is checked against the answer `digits` gave for that
row in one batched pass at the start. Per concurrency level: a warm-up per
combination, then --requests calls per combination (client x batching) in
--rounds rounds; the order of the combinations reverses every round, so on
and off alternate which goes first. Clients: `mlmesh` is
mlmesh_inference.triton.TritonClient (what the gateway uses: metadata checks,
numpy in and out), `raw` is tritonclient.grpc.aio.InferenceServerClient with
the same request. One client (one gRPC channel) per kind; concurrency c = c
asyncio tasks each calling one after another.

Prints p50/p90/p99 latency (ms), requests/s, the average batch size Triton
executed (inference_count / execution_count from its statistics), CPU
microseconds per request of the client, tritonserver and the model's python
stub process, and per client the batching on/off requests/s ratio at each
level with the p50s side by side (and the same for each delay<N> against
off). Writes bench/results/triton_digits.json.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import _common as common
import _triton as tb
import numpy as np
import tritonclient.grpc.aio as grpcclient
from mlmesh_inference.triton import TritonClient
from mlmesh_triton.build import digits_training_data

NAME = "triton_digits"
ON, OFF = "digits", "digits-nobatch"
MODELS = {"on": ON, "off": OFF}  # mode -> Triton model; --extra-delays adds "delay<N>"
CLIENTS = ("mlmesh", "raw")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=4000,
        help="measured calls per client, batching mode and level (default 4000)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=200,
        help="unmeasured calls per combination before each level (default 200)",
    )
    parser.add_argument(
        "--concurrency", default="1,32", help="comma-separated concurrency levels (default 1,32)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds per level; the combinations' order reverses each round (default 4)",
    )
    parser.add_argument(
        "--clients", default="mlmesh,raw", help="which clients to measure (default mlmesh,raw)"
    )
    parser.add_argument(
        "--extra-delays",
        default="",
        help="also measure copies of digits with dynamic batching and these "
        "max_queue_delay_microseconds values, comma-separated (default: none)",
    )
    common.add_common_args(parser)
    args = parser.parse_args()
    try:
        args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        parser.error("--concurrency must be comma-separated integers")
    args.client_list = [c.strip() for c in args.clients.split(",") if c.strip()]
    try:
        args.delays = [int(x) for x in args.extra_delays.split(",") if x.strip()]
    except ValueError:
        parser.error("--extra-delays must be comma-separated integers")
    if any(d < 0 for d in args.delays):
        parser.error("--extra-delays must be >= 0")
    if not args.client_list or set(args.client_list) - set(CLIENTS):
        parser.error(f"--clients must name some of {', '.join(CLIENTS)}")
    if not args.levels or min(args.levels) < 1 or args.requests < 1 or args.rounds < 1:
        parser.error("concurrency levels, --requests and --rounds must be >= 1")
    args.rounds = min(args.rounds, args.requests)
    return args


_NAME_LINE = re.compile(r"^\s*name\s*:.*$\n?", re.MULTILINE)
_BATCHING_LINE = re.compile(r"^\s*dynamic_batching\s*\{[^}]*\}\s*$\n?", re.MULTILINE)


def make_variant(repository: Path, name: str, delay_us: int | None) -> str:
    """Copies the digits model directory to ``name``: same weights and version,
    without dynamic batching (``delay_us`` None) or with it and that delay."""
    source, target = repository / ON, repository / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*"))
    text = (source / "config.pbtxt").read_text()
    if not _BATCHING_LINE.search(text):
        raise RuntimeError(f"no dynamic_batching line in {source / 'config.pbtxt'}:\n{text}")
    body = _BATCHING_LINE.sub("", _NAME_LINE.sub("", text)).strip()
    if delay_us is not None:
        body += f"\ndynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}"
    config = f'name: "{name}"\n{body}\n'
    (target / "config.pbtxt").write_text(config)
    return config


class Digits:
    """Rows of the digits data and the expected argmax for each."""

    def __init__(self) -> None:
        x, _labels = digits_training_data()
        self.rows = [x[i : i + 1].copy() for i in range(len(x))]
        self.x = x
        self.expected: np.ndarray | None = None

    def row(self, i: int) -> np.ndarray:
        return self.rows[i % len(self.rows)]

    def check(self, i: int, probabilities: np.ndarray) -> str | None:
        if probabilities.shape != (1, 10):
            return f"shape {list(probabilities.shape)}"
        assert self.expected is not None
        if int(probabilities[0].argmax()) != int(self.expected[i % len(self.rows)]):
            return "argmax"
        return None


async def reference(client: TritonClient, digits: Digits) -> dict[str, Any]:
    """Batched pass over all rows on both models: expected argmax, agreement."""
    outs: dict[str, np.ndarray] = {}
    for mode, model in MODELS.items():
        parts = []
        for start in range(0, len(digits.x), 64):
            result = await client.infer(model, {"pixels": digits.x[start : start + 64]})
            parts.append(result.outputs["probabilities"])
        outs[mode] = np.concatenate(parts)
    _x, labels = digits_training_data()
    digits.expected = outs["on"].argmax(axis=1)
    return {
        "rows": len(digits.x),
        "train_accuracy_on": float((outs["on"].argmax(axis=1) == labels).mean()),
        "max_abs_diff_vs_on": {
            mode: float(np.abs(outs["on"] - out).max()) for mode, out in outs.items()
        },
        "row_sum_max_error": float(np.abs(outs["on"].sum(axis=1) - 1).max()),
    }


def callers(clients: dict[str, Any], digits: Digits) -> dict[tuple[str, str], Any]:
    """{(client, mode): async call(i) -> problem or None}."""
    mlmesh, raw = clients.get("mlmesh"), clients.get("raw")
    out: dict[tuple[str, str], Any] = {}
    for mode, model in MODELS.items():
        if mlmesh is not None:

            async def via_mlmesh(i: int, model: str = model) -> str | None:
                result = await mlmesh.infer(model, {"pixels": digits.row(i)})
                return digits.check(i, result.outputs["probabilities"])

            out[("mlmesh", mode)] = via_mlmesh
        if raw is not None:
            wanted = [grpcclient.InferRequestedOutput("probabilities")]

            async def via_raw(i: int, model: str = model, wanted: Any = wanted) -> str | None:
                tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
                tensor.set_data_from_numpy(digits.row(i))
                result = await raw.infer(
                    model, [tensor], outputs=wanted, client_timeout=tb.CALL_TIMEOUT
                )
                return digits.check(i, result.as_numpy("probabilities"))

            out[("raw", mode)] = via_raw
    return out


async def main(args: argparse.Namespace) -> int:
    results: dict[int, dict[str, dict[str, Any]]] = {}
    variants: dict[str, int | None] = {OFF: None}
    for delay in args.delays:
        MODELS[f"delay{delay}"] = f"digits-delay{delay}"
        variants[f"digits-delay{delay}"] = delay
    async with common.running_mesh(args, ("registry", "triton", "deployer")) as (
        mesh,
        ready,
        workdir,
    ):
        url = f"127.0.0.1:{ready['services']['triton']['port']}"
        repository = workdir / "state" / "triton-repository"
        async with TritonClient(url, timeout_s=tb.CALL_TIMEOUT) as admin:
            await tb.wait_ready(admin, ON, 60)
            variant_configs = {}
            started = time.monotonic()
            for name, delay in variants.items():
                variant_configs[name] = make_variant(repository, name, delay)
                await admin.load_model(name)
                await tb.wait_ready(admin, name)
            load_s = time.monotonic() - started
        raw_admin = grpcclient.InferenceServerClient(url)
        mlmesh = (
            TritonClient(url, timeout_s=tb.CALL_TIMEOUT) if "mlmesh" in args.client_list else None
        )
        raw = grpcclient.InferenceServerClient(url) if "raw" in args.client_list else None
        try:
            configs = {
                mode: await raw_admin.get_model_config(model, as_json=True)
                for mode, model in MODELS.items()
            }
            seen_batching = {
                mode: cfg.get("config", {}).get("dynamic_batching") for mode, cfg in configs.items()
            }
            for mode, batching in seen_batching.items():
                if (batching is None) != (mode == "off"):
                    raise RuntimeError(f"Triton's dynamic_batching per model: {seen_batching}")
                if mode.startswith("delay") and int(
                    batching.get("max_queue_delay_microseconds", 0)
                ) != int(mode.removeprefix("delay")):
                    raise RuntimeError(f"{MODELS[mode]}: Triton's config has {batching}")
            digits = Digits()
            async with TritonClient(url, timeout_s=tb.CALL_TIMEOUT) as checker:
                check = await reference(checker, digits)
            if max(check["max_abs_diff_vs_on"].values()) > 1e-5:
                raise RuntimeError(f"the digits variants disagree: {check}")
            meter = tb.meter_for(mesh, repository, tuple(MODELS.values()))
            print(
                f"triton {url}; {', '.join(variants)} loaded in {load_s:.1f}s; dynamic batching "
                + ", ".join(f"{m}={seen_batching[m]}" for m in MODELS)
                + "; "
                f"{args.requests} calls per combination and level in {args.rounds} rounds, "
                f"warm-up {args.warmup}; cpu meter: {', '.join(sorted(meter.pids))}",
                flush=True,
            )
            clients = {"mlmesh": mlmesh, "raw": raw}
            calls = callers({k: v for k, v in clients.items() if v is not None}, digits)
            combos = [(c, m) for c in args.client_list for m in MODELS]
            index = 0
            for level in args.levels:
                for combo in combos:
                    warm = tb.Burst()
                    await warm.run(calls[combo], args.warmup, level, index)
                    index += args.warmup
                    if warm.errors or warm.wrong:
                        print(
                            f"  warm-up {combo} c={level}: errors {dict(warm.errors)} "
                            f"wrong {dict(warm.wrong)} {warm.first_error}"
                        )
                bursts = {combo: tb.Burst() for combo in combos}
                cpu: dict[tuple[str, str], dict[str, float]] = {combo: {} for combo in combos}
                counts = {combo: [0, 0] for combo in combos}  # inferences, executions
                for r in range(args.rounds):
                    count = args.requests // args.rounds + (
                        1 if r < args.requests % args.rounds else 0
                    )
                    for combo in combos if r % 2 == 0 else combos[::-1]:
                        model = MODELS[combo[1]]
                        stats_before = await tb.model_counts(raw_admin, model)
                        before = meter.sample()
                        await bursts[combo].run(calls[combo], count, level, index)
                        tb.add_cpu(cpu[combo], meter.delta(before, meter.sample()))
                        stats_after = await tb.model_counts(raw_admin, model)
                        index += count
                        counts[combo][0] += (
                            stats_after["inference_count"] - stats_before["inference_count"]
                        )
                        counts[combo][1] += (
                            stats_after["execution_count"] - stats_before["execution_count"]
                        )
                results[level] = {}
                for combo in combos:
                    summary = tb.summarize(bursts[combo], cpu[combo])
                    inferences, executions = counts[combo]
                    summary["triton_inferences"] = inferences
                    summary["triton_executions"] = executions
                    summary["avg_batch"] = inferences / executions if executions else float("nan")
                    results[level][f"{combo[0]}/{combo[1]}"] = summary
                line = " | ".join(
                    f"{c} {m} p50 {results[level][f'{c}/{m}']['p50_ms']:.3f} ms "
                    f"{results[level][f'{c}/{m}']['rps']:6.0f}/s"
                    for c, m in combos
                )
                print(f"  c={level:<3d} {line}", flush=True)
        finally:
            for client in (mlmesh, raw, raw_admin):
                if client is not None:
                    await client.close()

    rows, derived = [], {}
    for level, by_combo in results.items():
        for key, s in by_combo.items():
            client, mode = key.split("/")
            cpu_us = s["cpu_us_per_request"]
            rows.append(
                [
                    f"c={level}",
                    client,
                    mode,
                    s["ok"],
                    sum(s["errors"].values()),
                    sum(s["wrong"].values()),
                    s["p50_ms"],
                    s["p90_ms"],
                    s["p99_ms"],
                    s["max_ms"],
                    s["rps"],
                    s["avg_batch"],
                    cpu_us.get("client"),
                    cpu_us.get("triton"),
                    cpu_us.get(f"stub:{MODELS[mode]}"),
                    cpu_us.get("other"),
                ]
            )
        for client in args.client_list:
            off = by_combo[f"{client}/off"]
            for mode in MODELS:
                if mode == "off":
                    continue
                on = by_combo[f"{client}/{mode}"]
                derived[f"c={level}/{client}/{mode}"] = {
                    "level": level,
                    "client": client,
                    "batching": mode,
                    "rps_ratio_on_over_off": on["rps"] / off["rps"],
                    "p50_on_ms": on["p50_ms"],
                    "p50_off_ms": off["p50_ms"],
                    "p99_on_ms": on["p99_ms"],
                    "p99_off_ms": off["p99_ms"],
                    "rps_on": on["rps"],
                    "rps_off": off["rps"],
                }
    print()
    print(
        "digits on Triton, single-row requests (1 x 64 FP32): latency ms, requests/s, "
        "avg batch Triton executed, CPU us per request (stub = the model's python backend process, "
        "other = the rest of the machine)"
    )
    print(
        common.table(
            [
                "level",
                "client",
                "batching",
                "ok",
                "err",
                "wrong",
                "p50",
                "p90",
                "p99",
                "max",
                "req/s",
                "avg batch",
                "cpu client",
                "cpu triton",
                "cpu stub",
                "cpu other",
            ],
            rows,
        )
    )
    print()
    print(
        common.table(
            [
                "level",
                "client",
                "batching",
                "on/off req/s",
                "req/s on",
                "req/s off",
                "p50 on",
                "p50 off",
            ],
            [
                [
                    f"c={v['level']}",
                    v["client"],
                    v["batching"],
                    v["rps_ratio_on_over_off"],
                    v["rps_on"],
                    v["rps_off"],
                    v["p50_on_ms"],
                    v["p50_off_ms"],
                ]
                for v in derived.values()
            ],
        )
    )
    payload = {
        "benchmark": NAME,
        "params": {
            "requests": args.requests,
            "warmup": args.warmup,
            "levels": args.levels,
            "rounds": args.rounds,
            "clients": args.client_list,
            "models": MODELS,
        },
        "environment": {**common.environment(args), "triton_env": tb.torch_env()},
        "setup": {
            "variants_load_seconds": round(load_s, 2),
            "variant_configs_pbtxt": variant_configs,
            "triton_configs": configs,
            "reference_check": check,
        },
        "results": {str(k): v for k, v in results.items()},
        "derived": derived,
    }
    print(f"\nresults: {common.write_json(NAME, args, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

"""What prediction logging adds to Infer, in one run: unary Infer on digits
(1 x 64 FP32) through Envoy + the gateway, logged to the monitor at sample
rate 1.0 against the same model with logging off.

    .venv/bin/python bench/prediction_logging.py [--requests 2000] [--rounds 4] \
        [--concurrency 1]

Starts its own mesh (registry + Triton + deployer + monitor + gateway +
Envoy) in a temporary state directory. The gateway logs every call
(MLMESH_GATEWAY_PREDICTION_SAMPLE_RATE=1.0) but that of the model
`digits-off` (MLMESH_GATEWAY_PREDICTION_SAMPLE_RATES=digits-off=0): a copy
of the deployed digits version's folder in Triton's repository under that
name (same weights, same Triton, its own python stub), loaded through
Triton's model control API. Both arms name their version, so neither asks
the registry; both run in the same processes at the same time, and the
rounds alternate their order: "logged" (digits) is the full production
path with the prediction log's sampling check and append on the request
path and its flusher sending batches to the monitor in the background;
"off" (digits-off) differs only by the sampling check returning early.

Per round --requests / --rounds calls per arm with --concurrency closed-loop
tasks; after a warm-up per arm. Prints p50/p90/p99 (ms) and requests/s per
arm, the added p50/p99 (logged - off) against the aim (under 0.1 ms at
p50), the monitor's count of logged digits predictions (every logged call
should be there), and the gateway's log counters (sent / dropped / failed).
Writes bench/results/prediction_logging.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import _common as common
import _triton as tb
import numpy as np
from google.protobuf import duration_pb2
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.monitor.v1 import monitor_service_pb2 as mrpc
from mlmesh.monitor.v1 import monitor_service_pb2_grpc
from mlmesh_inference.triton import TritonClient
from mlmesh_triton.build import digits_training_data

NAME = "prediction_logging"
SERVICES = ("registry", "triton", "deployer", "monitor", "gateway")
LOGGED, OFF = "digits", "digits-off"
ARMS = {"logged": LOGGED, "off": OFF}
GOAL_ADDED_P50_MS = 0.1
CALL_TIMEOUT = 30.0


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="measured calls per arm")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up calls per arm")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; arms alternate order")
    parser.add_argument("--concurrency", type=int, default=1, help="closed-loop tasks")
    common.add_common_args(parser)
    args = parser.parse_args()
    if min(args.requests, args.rounds, args.concurrency) < 1 or args.requests < args.rounds:
        parser.error("--requests >= --rounds >= 1 and --concurrency >= 1")
    return args


def request(model: str, version: int, row: np.ndarray) -> rpc.InferRequest:
    return rpc.InferRequest(
        model=model_reference_pb2.ModelReference(model=model, version=version),
        inputs=[
            gateway_pb2.InferTensor(
                name="pixels", datatype="FP32", shape=[1, 64], raw_contents=row.tobytes()
            )
        ],
    )


async def load_copy(triton: TritonClient, repository: Path) -> int:
    """digits-off on Triton: the deployed digits folder copied under that
    name and loaded; returns the version (the same number as digits')."""
    source = repository / LOGGED
    versions = sorted(int(p.name) for p in source.iterdir() if p.name.isdigit())
    if not versions:
        raise RuntimeError(f"no digits version in {source}")
    target = repository / OFF
    shutil.rmtree(target, ignore_errors=True)
    await asyncio.to_thread(
        shutil.copytree, source, target, ignore=shutil.ignore_patterns("__pycache__")
    )
    config = target / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace(f'name: "{LOGGED}"', f'name: "{OFF}"', 1))
    await triton.load_model(OFF)
    return versions[-1]


def gateway_counters(metrics_port: int | None) -> dict[str, float]:
    if not metrics_port:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as error:
        return {"error": str(error)}  # type: ignore[dict-item]
    out = {}
    for line in text.splitlines():
        if line.startswith("mlmesh_gateway_predictions_logged_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


async def main(args: argparse.Namespace) -> int:
    os.environ["MLMESH_GATEWAY_PREDICTION_SAMPLE_RATE"] = "1.0"
    os.environ["MLMESH_GATEWAY_PREDICTION_SAMPLE_RATES"] = f"{OFF}=0"
    # Only digits on Triton (the embedders would take memory and CPU).
    os.environ["MLMESH_DEPLOYER_MODELS"] = f"{LOGGED}@champion"
    x, _ = digits_training_data()
    rows = [x[i : i + 1].astype(np.float32).copy() for i in range(len(x))]
    results: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    async with common.running_mesh(args, SERVICES) as (mesh, ready, workdir):
        services = ready["services"]
        envoy = ready["address"]
        admin_key = mesh.admin_key()
        async with TritonClient(f"127.0.0.1:{services['triton']['port']}") as triton:
            await tb.wait_ready(triton, LOGGED, 240)
            version = await load_copy(triton, workdir / "state" / "triton-repository")
            await tb.wait_ready(triton, OFF, 240)
        checks["version"] = version
        secret = await common.app_key(
            envoy,
            admin_key,
            gateway_pb2.PLATFORM_SERVICE_INFER,
            gateway_pb2.PLATFORM_SERVICE_MONITOR,
        )
        async with common.channel(envoy, api_key=secret) as channel:
            gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)

            def caller(model: str) -> Any:
                async def call(i: int) -> str | None:
                    reply = await gateway.Infer(
                        request(model, version, rows[i % len(rows)]), timeout=CALL_TIMEOUT
                    )
                    return None if len(reply.outputs) == 1 else "outputs"

                return call

            calls = {arm: caller(model) for arm, model in ARMS.items()}
            index = 0
            for arm in ARMS:
                warm = tb.Burst()
                await warm.run(calls[arm], args.warmup, args.concurrency, index)
                index += args.warmup
                if warm.errors:
                    raise RuntimeError(f"warm-up {arm}: {warm.first_error}")
            counters_before = gateway_counters(services["gateway"].get("metrics_port"))
            bursts = {arm: tb.Burst() for arm in ARMS}
            for r in range(args.rounds):
                count = args.requests // args.rounds + (1 if r < args.requests % args.rounds else 0)
                order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
                for arm in order:
                    await bursts[arm].run(calls[arm], count, args.concurrency, index)
                    index += count
            await asyncio.sleep(3)  # the flusher's last batch (every second)
            counters_after = gateway_counters(services["gateway"].get("metrics_port"))
            monitor = monitor_service_pb2_grpc.MonitorServiceStub(channel)
            quality = await monitor.GetModelQuality(
                mrpc.GetModelQualityRequest(
                    model=LOGGED, window=duration_pb2.Duration(seconds=3600)
                )
            )
            unlogged = await monitor.GetModelQuality(
                mrpc.GetModelQualityRequest(model=OFF, window=duration_pb2.Duration(seconds=3600))
            )
        for arm, burst in bursts.items():
            results[arm] = tb.summarize(burst, {})
        checks["monitor_digits_predictions"] = sum(
            v.overall.request_count for v in quality.versions
        )
        checks["monitor_digits_off_predictions"] = sum(
            v.overall.request_count for v in unlogged.versions
        )
        checks["logged_calls_made"] = args.warmup + args.requests
        checks["gateway_log_counters_during_measure"] = {
            k: counters_after.get(k, 0.0) - counters_before.get(k, 0.0) for k in counters_after
        }
    added_p50 = results["logged"]["p50_ms"] - results["off"]["p50_ms"]
    added_p99 = results["logged"]["p99_ms"] - results["off"]["p99_ms"]
    print(
        common.table(
            ["arm", "ok", "errors", "p50 ms", "p90 ms", "p99 ms", "req/s"],
            [
                [
                    arm,
                    s["ok"],
                    sum(s["errors"].values()),
                    s["p50_ms"],
                    s["p90_ms"],
                    s["p99_ms"],
                    s["rps"],
                ]
                for arm, s in results.items()
            ],
        )
    )
    print(
        f"added by logging at rate 1.0: p50 {added_p50 * 1000:+.1f} us, p99 "
        f"{added_p99 * 1000:+.1f} us (aim: under {GOAL_ADDED_P50_MS * 1000:.0f} us at p50)"
    )
    print(f"checks: {json.dumps(checks)}")
    payload = {
        "benchmark": NAME,
        "environment": common.environment(args),
        "settings": {
            "requests_per_arm": args.requests,
            "warmup_per_arm": args.warmup,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "sample_rate_logged": 1.0,
            "sample_rate_off": 0.0,
        },
        "results": results,
        "added_p50_ms": added_p50,
        "added_p99_ms": added_p99,
        "goal_added_p50_ms": GOAL_ADDED_P50_MS,
        "checks": checks,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = common.write_json(NAME, args, payload)
    print(f"wrote {path}")
    failed = sum(sum(s["errors"].values()) for s in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

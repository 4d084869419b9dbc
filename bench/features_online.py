"""Online feature reads: mlmesh's GetOnlineFeatures through Envoy (keys on)
against Feast's own feature server (`feast serve`, HTTP/JSON) on the same
data, in one run.

    .venv/bin/python bench/features_online.py [--stores sqlite,redis] \\
        [--entities 10000] [--features 20] [--shapes 1,100] [--concurrency 1,16] \\
        [--requests 1000] [--rounds 4] [--feast-workers 2]

Per store, a mesh of the feature service and the gateway (the key
directory) starts in a temp dir; a bench definition (one entity, a row view
of ``--features`` float features) is applied through Envoy, and
``--entities`` rows are written with Push (1000 per call: its rows/s is
reported too). Then, per shape (entities per request) and concurrency, the
same requests go to each target in alternating rounds: `mlmesh` (Envoy ->
features, an application key with the FEATURES scope) and, on Redis, `feast`
(`feast serve --workers N` over the same registry and Redis, started from
the services' environment). Every answer is checked (row count, statuses,
one value per request compared with the data). Redis is the machine's
(127.0.0.1:6379, database 13, flushed before and after).

The mlmesh side reads Feast's online layout itself (mlmesh_features.online:
one pipelined HMGET round trip per call on an asyncio Redis client, or one
SELECT on a reader thread) and writes the response's bytes directly; the
Feast side is Feast's own server over the very same keys, so each answer
checks the other's layout too.

Figures: p50/p90/p99 ms and requests/s per target; the ratios mlmesh/feast;
the machine's load average before and after each store (the machine may be
shared: compare ratios within a run).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import _common as common
import grpc
import httpx
import pandas as pd
from google.protobuf import struct_pb2, timestamp_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh.gateway.v1 import gateway_pb2

REDIS = "redis://127.0.0.1:6379/13"
VIEW = "bench_stats"
CALL_TIMEOUT = 30.0


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--shapes", default="1,100", help="entities per request")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--requests", type=int, default=1000, help="per target, shape and level")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--feast-workers", type=int, default=2)
    common.add_common_args(parser)
    args = parser.parse_args()
    args.shape_list = [int(x) for x in args.shapes.split(",")]
    args.levels = [int(x) for x in args.concurrency.split(",")]
    return args


def definitions(features: int) -> str:
    columns = ", ".join(f"f{i:02d}: double" for i in range(features))
    rows = "\n".join(
        f"      - {{name: f{i:02d}, type: double, expression: f{i:02d}}}" for i in range(features)
    )
    return (
        textwrap.dedent(
            """\
        entities:
          - {{name: bench_user, join_key: user_id, value_type: int64}}
        sources:
          - name: bench_rows
            path: /nonexistent/bench.parquet
            timestamp_field: event_time
            columns: {{user_id: int64, {columns}}}
        feature_views:
          - name: {view}
            entities: [bench_user]
            source: bench_rows
            features:
        """
        ).format(columns=columns, view=VIEW)
        + rows
        + "\n"
    )


def data(entities: int, features: int) -> pd.DataFrame:
    rng = random.Random(1)
    frame = pd.DataFrame({"user_id": range(1, entities + 1)})
    for i in range(features):
        frame[f"f{i:02d}"] = [round(rng.uniform(0, 1000), 6) for _ in range(entities)]
    return frame


async def load(stub: Any, frame: pd.DataFrame, features: int) -> dict[str, float]:
    """Writes every row with Push, 1000 a call; rows/s."""
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    names = [f"f{i:02d}" for i in range(features)]
    records = frame.to_dict("records")
    started = time.perf_counter()
    for start in range(0, len(records), 1000):
        rows = [
            rpc.PushRow(
                values={
                    "user_id": struct_pb2.Value(number_value=r["user_id"]),
                    **{n: struct_pb2.Value(number_value=r[n]) for n in names},
                },
                event_time=now,
            )
            for r in records[start : start + 1000]
        ]
        await stub.Push(rpc.PushRequest(feature_view=VIEW, rows=rows), timeout=120)
    seconds = time.perf_counter() - started
    return {
        "rows": len(records),
        "seconds": round(seconds, 3),
        "rows_per_s": len(records) / seconds,
    }


class Burst:
    """``total`` calls of ``call(i)`` over ``concurrency`` tasks; ms latencies."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.seconds = 0.0

    async def run(self, call: Any, total: int, concurrency: int) -> None:
        counter = iter(range(total))

        async def worker() -> None:
            for i in counter:
                started = time.perf_counter()
                try:
                    await call(i)
                except Exception as error:  # counted, shown
                    name = (
                        error.code().name
                        if isinstance(error, grpc.RpcError)
                        else type(error).__name__
                    )
                    self.errors[name] += 1
                    continue
                self.latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
        self.seconds += time.perf_counter() - started

    def summary(self) -> dict[str, Any]:
        ms = sorted(self.latencies)
        return {
            "ok": len(ms),
            "errors": dict(self.errors),
            "rps": len(ms) / self.seconds if self.seconds else float("nan"),
            "p50_ms": common.percentile(ms, 50),
            "p90_ms": common.percentile(ms, 90),
            "p99_ms": common.percentile(ms, 99),
        }


def _free_port() -> int:
    # feast serve takes a port number; this probe races only with this machine.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def feast_server(root: Path, workers: int, workdir: Path):  # type: ignore[no-untyped-def]
    """`feast serve` over the features service's registry and Redis."""
    repo = workdir / "feast_repo"
    repo.mkdir()
    (repo / "feature_store.yaml").write_text(
        textwrap.dedent(
            f"""\
            project: mlmesh
            provider: local
            registry:
              path: {root / "registry.db"}
              cache_ttl_seconds: 600
            online_store:
              type: redis
              connection_string: "127.0.0.1:6379,db=13"
            offline_store:
              type: file
            entity_key_serialization_version: 3
            """
        )
    )
    port = _free_port()
    feast = Path(sys.executable).with_name("feast")
    log = (workdir / "feast-serve.log").open("wb")
    process = subprocess.Popen(
        [
            str(feast),
            "-c",
            str(repo),
            "serve",
            "-p",
            str(port),
            "-w",
            str(workers),
            "--no-access-log",
            "-r",
            "600",
            "--max-requests",
            "1000000",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"feast serve did not start; see {log.name}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        log.close()


def calls(
    stub: Any,
    http: httpx.AsyncClient,
    feast_url: str | None,
    batches: list[list[int]],
    grpc_requests: list[rpc.GetOnlineFeaturesRequest],
    bodies: list[str],
    values: pd.DataFrame,
) -> dict[str, Any]:
    """The call each target answers for request ``i``, every answer checked:
    as many rows as entities, PRESENT, and one value against the data."""
    shape = len(batches[0])

    async def mlmesh_call(i: int) -> None:
        k = i % len(batches)
        reply = await stub.GetOnlineFeatures(grpc_requests[k], timeout=CALL_TIMEOUT)
        first = reply.rows[0].values[3] if reply.rows else None
        if len(reply.rows) != shape or first is None or first.status != pb.FEATURE_STATUS_PRESENT:
            raise ValueError("wrong rows")
        if first.value.number_value != values.at[batches[k][0], "f03"]:
            raise ValueError("wrong value")

    async def feast_call(i: int) -> None:
        k = i % len(batches)
        answer = await http.post(
            f"{feast_url}/get-online-features",
            content=bodies[k],
            headers={"content-type": "application/json"},
        )
        answer.raise_for_status()
        body = answer.json()
        # Feast orders the columns its own way: the entity, then the view's.
        f03 = body["results"][body["metadata"]["feature_names"].index("f03")]
        if f03["statuses"][0] != "PRESENT" or len(f03["values"]) != shape:
            raise ValueError("wrong rows")
        if f03["values"][0] != values.at[batches[k][0], "f03"]:
            raise ValueError("wrong value")

    targets: dict[str, Any] = {"mlmesh": mlmesh_call}
    if feast_url:
        targets["feast"] = feast_call
    return targets


async def flush_redis() -> None:
    await asyncio.to_thread(
        subprocess.run, ["redis-cli", "-n", "13", "flushdb"], check=True, capture_output=True
    )


async def measure_store(
    args: argparse.Namespace, store: str, frame: pd.DataFrame
) -> dict[str, Any]:
    if store == "redis":
        await flush_redis()
        os.environ["MLMESH_FEATURES_ONLINE_STORE"] = REDIS
    else:
        os.environ.pop("MLMESH_FEATURES_ONLINE_STORE", None)
    out: dict[str, Any] = {"store": store, "load_before": os.getloadavg()}
    names = [f"f{i:02d}" for i in range(args.features)]
    rng = random.Random(2)
    async with common.running_mesh(args, ("features", "gateway")) as (mesh, ready, workdir):
        target = ready["address"]
        secret = await common.app_key(
            target, mesh.admin_key(), gateway_pb2.PLATFORM_SERVICE_FEATURES
        )
        async with common.channel(target, api_key=secret) as channel:
            stub = features_service_pb2_grpc.FeatureServiceStub(channel)
            await stub.ApplyFeatureDefinitions(
                rpc.ApplyFeatureDefinitionsRequest(source=definitions(args.features)),
                timeout=300,
            )
            out["push"] = await load(stub, frame, args.features)
            print(f"[{store}] push: {out['push']['rows_per_s']:.0f} rows/s", flush=True)
            values = frame.set_index("user_id")
            references = [f"{VIEW}:{n}" for n in names]
            feast_cm = (
                feast_server(workdir / "state" / "features", args.feast_workers, workdir)
                if store == "redis"
                else contextlib.nullcontext(None)
            )
            with feast_cm as feast_url:
                async with httpx.AsyncClient(
                    timeout=CALL_TIMEOUT, limits=httpx.Limits(max_connections=64)
                ) as http:
                    for shape in args.shape_list:
                        batches = [
                            rng.sample(range(1, args.entities + 1), shape) for _ in range(256)
                        ]
                        grpc_requests = [
                            rpc.GetOnlineFeaturesRequest(
                                features=rpc.FeatureReferences(references=references),
                                entity_rows=[
                                    pb.EntityRow(
                                        join_keys={"user_id": struct_pb2.Value(number_value=u)}
                                    )
                                    for u in batch
                                ],
                            )
                            for batch in batches
                        ]
                        bodies = [
                            json.dumps({"features": references, "entities": {"user_id": batch}})
                            for batch in batches
                        ]

                        targets = calls(
                            stub, http, feast_url, batches, grpc_requests, bodies, values
                        )
                        for level in args.levels:
                            bursts = {name: Burst() for name in targets}
                            for name, call in targets.items():
                                warm = Burst()
                                await warm.run(call, args.warmup, level)
                                if warm.errors:
                                    print(
                                        f"  warm-up {name}: errors {dict(warm.errors)}", flush=True
                                    )
                            per_round = max(1, args.requests // args.rounds)
                            for r in range(args.rounds):
                                order = list(targets) if r % 2 == 0 else list(reversed(targets))
                                for name in order:
                                    await bursts[name].run(targets[name], per_round, level)
                            key = f"{shape}x{args.features} c={level}"
                            out[key] = {name: b.summary() for name, b in bursts.items()}
                            line = " | ".join(
                                f"{name} p50 {s['p50_ms']:.2f} p99 {s['p99_ms']:.2f} ms "
                                f"{s['rps']:.0f}/s err {sum(s['errors'].values())}"
                                for name, s in out[key].items()
                            )
                            print(f"[{store}] {key}: {line}", flush=True)
    if store == "redis":
        await flush_redis()
    out["load_after"] = os.getloadavg()
    print(
        f"[{store}] load average before {out['load_before'][0]:.2f}, "
        f"after {out['load_after'][0]:.2f} (1 min; {os.cpu_count()} CPUs)",
        flush=True,
    )
    return out


async def main(args: argparse.Namespace) -> int:
    frame = data(args.entities, args.features)
    results = {
        "environment": common.environment(args),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))},
        "stores": [],
    }
    for store in args.stores.split(","):
        results["stores"].append(await measure_store(args, store, frame))
    rows = []
    for store in results["stores"]:
        for key, by_target in store.items():
            if not isinstance(by_target, dict) or "mlmesh" not in by_target:
                continue
            m = by_target["mlmesh"]
            f = by_target.get("feast")
            rows.append(
                [
                    store["store"],
                    key,
                    m["p50_ms"],
                    m["p99_ms"],
                    m["rps"],
                    f["p50_ms"] if f else "",
                    f["p99_ms"] if f else "",
                    f["rps"] if f else "",
                    m["rps"] / f["rps"] if f and f["rps"] else "",
                ]
            )
    print()
    print(
        common.table(
            [
                "store",
                "shape",
                "mlmesh p50",
                "p99",
                "req/s",
                "feast p50",
                "p99",
                "req/s",
                "mlmesh/feast req/s",
            ],
            rows,
        )
    )
    output = args.output or common.RESULTS_DIR / "features_online.json"
    output.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {output}")
    return 0


if __name__ == "__main__":
    arguments = parse()
    tempfile.tempdir = str(arguments.tmpdir) if arguments.tmpdir else None
    sys.exit(asyncio.run(asyncio.wait_for(main(arguments), arguments.max_seconds)))

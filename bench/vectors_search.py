"""Nearest-neighbour search: qdrant-edge called directly, and mlmesh's vector
service through Envoy (keys on) with one process and with read replicas,
on the same data in one run.

    .venv/bin/python bench/vectors_search.py [--points 100000] [--dim 384] \\
        [--queries 1000] [--replicas 1,2] [--concurrency 1,4] [--ef 64] \\
        [--batch 16,64] [--batch-concurrency 2,4] [--batch-cases plain,filter10]

Data: ``--points`` clustered unit vectors (100 Gaussian clusters; cosine),
each with an integer payload ``group`` (0..99, independent of the cluster),
and ``--queries`` queries drawn the same way; the exact top-10 of every query
(numpy, brute force) is the ground truth. The filtered case keeps the points
whose ``group`` is any of 10 values (about 10%), with its own exact top-10.

- ``direct``: one ``qdrant_edge.EdgeShard`` in this process (HNSW m 16,
  ef_construct 100; search ef ``--ef``): build = upsert + optimize; then the
  queries one after another (one core: the engine holds the GIL); and, for
  reference, the same queries in ``query_batch`` calls of each ``--batch``
  size (``direct`` ``plain batchB``).
- ``mesh rN cC``: a mesh of the vector service with N processes (the primary
  and N-1 read replicas) and the gateway (keys), through Envoy with an
  application key: build = UpsertPoints (500 per call) until every instance
  reports the whole collection indexed (no index build running on the
  primary, and every replica holding the primary's index), and until the
  service's processes are idle (the primary's base snapshot taken); then the
  queries with C in flight (Envoy spreads them over the instances), each hit
  list checked for recall; and once more as SearchBatch calls of B queries
  (each ``--batch`` size), C in flight (each ``--batch-concurrency``), for
  each of ``--batch-cases`` (latencies per call). ``--concurrency ""``
  leaves out the single-query cases, ``--batch ""`` the batched ones.

Figures: build seconds, recall@10, queries/s, p50 and p99 ms; ratios of
queries/s against ``direct``'s queries one after another (``plain`` or
``filter10``) in the same run; ``cpu us/q``: CPU time per query of the
vector service's processes (all of them; for ``direct``, of this process),
which the machine's other load disturbs less than queries/s. The machine's
other load shows in the load average printed beside them; compare ratios,
not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common
import numpy as np
from mlmesh.gateway.v1 import gateway_pb2
from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh.vectors.v1 import vectors_service_pb2 as rpc
from mlmesh.vectors.v1 import vectors_service_pb2_grpc
from mlmesh_vectors.engine.base import FULL_SCAN_THRESHOLD_KB

CLUSTERS = 100
GROUPS = 100
FILTER_GROUPS = list(range(0, GROUPS, 10))  # 10 values: about 10% of the points
K = 10


def dataset(points: int, queries: int, dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2026)
    centers = rng.normal(size=(CLUSTERS, dim)).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        x = centers[rng.integers(0, CLUSTERS, n)] + 0.6 * rng.normal(size=(n, dim))
        x = x.astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return {
        "vectors": draw(points),
        "queries": draw(queries),
        "groups": rng.integers(0, GROUPS, points),
    }


def exact_top(vectors: np.ndarray, queries: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Indices of the exact cosine top-K per query (vectors are unit length)."""
    out = np.empty((len(queries), K), dtype=np.int64)
    allowed = np.flatnonzero(mask) if mask is not None else np.arange(len(vectors))
    subset = vectors[allowed]
    for start in range(0, len(queries), 100):
        scores = queries[start : start + 100] @ subset.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        out[start : start + 100] = allowed[np.take_along_axis(top, order, axis=1)]
    return out


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)])
    )


def summary(latencies: list[float], wall: float, found: list[list[int]], truth: np.ndarray) -> dict:
    ordered = sorted(latencies)
    return {
        "queries_per_s": len(latencies) / wall,
        "p50_ms": common.percentile(ordered, 50) * 1000,
        "p99_ms": common.percentile(ordered, 99) * 1000,
        "recall_at_10": recall(found, truth),
    }


def run_direct(data: dict[str, np.ndarray], args: Any, truth: dict[str, np.ndarray]) -> dict:
    import qdrant_edge as qe

    folder = Path(tempfile.mkdtemp(prefix="bench-edge-", dir=args.tmpdir))
    config = qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=args.dim, distance=qe.Distance.Cosine),
        # The service's engine settings (its full-scan threshold for filters).
        hnsw_config=qe.HnswIndexConfig(
            m=16, ef_construct=100, full_scan_threshold=FULL_SCAN_THRESHOLD_KB
        ),
    )
    shard = qe.EdgeShard.create(str(folder / "shard"), config)
    started = time.perf_counter()
    vectors, groups = data["vectors"], data["groups"]
    for start in range(0, len(vectors), 1000):
        shard.update(
            qe.UpdateOperation.upsert_points(
                [
                    qe.Point(id=i, vector=vectors[i].tolist(), payload={"group": int(groups[i])})
                    for i in range(start, min(start + 1000, len(vectors)))
                ]
            )
        )
    shard.update(qe.UpdateOperation.create_field_index("group", qe.PayloadSchemaType.Integer))
    shard.optimize()
    build = time.perf_counter() - started
    results: dict[str, Any] = {"build_s": build}
    for case, condition in (("plain", None), ("filter10", FILTER_GROUPS)):
        query_filter = (
            qe.Filter(must=[qe.FieldCondition(key="group", match=qe.MatchAny(any=condition))])
            if condition
            else None
        )
        latencies, found = [], []
        cpu_start = time.process_time()
        wall_start = time.perf_counter()
        for query in data["queries"]:
            t0 = time.perf_counter()
            hits = shard.query(
                qe.QueryRequest(
                    query=qe.Query.Nearest(query.tolist()),
                    limit=K,
                    filter=query_filter,
                    params=qe.SearchParams(hnsw_ef=args.ef),
                )
            )
            latencies.append(time.perf_counter() - t0)
            found.append([int(h.id) for h in hits])
        results[case] = summary(latencies, time.perf_counter() - wall_start, found, truth[case])
        results[case]["service_cpu_us_per_query"] = (
            (time.process_time() - cpu_start) / len(data["queries"]) * 1e6
        )
    queries = data["queries"]
    for batch in args.batch:
        latencies, found = [], []
        cpu_start = time.process_time()
        wall_start = time.perf_counter()
        for start in range(0, len(queries), batch):
            t0 = time.perf_counter()
            answers = shard.query_batch(
                qe.QueryBatchRequest(
                    [
                        qe.QueryRequest(
                            query=qe.Query.Nearest(query.tolist()),
                            limit=K,
                            params=qe.SearchParams(hnsw_ef=args.ef),
                        )
                        for query in queries[start : start + batch]
                    ]
                )
            )
            latencies.append(time.perf_counter() - t0)
            found.extend([int(h.id) for h in hits] for hits in answers)
        figures = summary(latencies, time.perf_counter() - wall_start, found, truth["plain"])
        figures["queries_per_s"] = len(queries) / (time.perf_counter() - wall_start)
        figures["service_cpu_us_per_query"] = (time.process_time() - cpu_start) / len(queries) * 1e6
        results[f"plain batch{batch}"] = figures
    shard.close()
    return results


async def run_mesh(
    data: dict[str, np.ndarray], args: Any, truth: dict[str, np.ndarray], replicas: int
) -> dict:
    os.environ["MLMESH_VECTORS_DEMO"] = "off"
    async with common.running_mesh(
        args, ("gateway", "vectors"), replicas={"vectors": replicas}
    ) as (mesh, ready, _):
        target = ready["address"]
        key = await common.app_key(target, mesh.admin_key(), gateway_pb2.PLATFORM_SERVICE_VECTORS)
        async with common.channel(target, api_key=key) as channel:
            stub = vectors_service_pb2_grpc.VectorServiceStub(channel)
            await stub.CreateCollection(
                rpc.CreateCollectionRequest(
                    collection=pb.Collection(
                        name="bench",
                        dimension=args.dim,
                        distance=pb.DISTANCE_COSINE,
                        payload_indexes=[
                            pb.PayloadIndex(key="group", type=pb.PAYLOAD_TYPE_INTEGER)
                        ],
                    )
                )
            )
            started = time.perf_counter()
            vectors, groups = data["vectors"], data["groups"]
            sequence = 0
            for start in range(0, len(vectors), 500):
                reply = await stub.UpsertPoints(
                    rpc.UpsertPointsRequest(
                        collection="bench",
                        points=[
                            pb.Point(
                                id=str(i),
                                vector=vectors[i].tolist(),
                                payload={"group": int(groups[i])},
                            )
                            for i in range(start, min(start + 500, len(vectors)))
                        ],
                    )
                )
                sequence = reply.write_sequence
            upsert_s = time.perf_counter() - started
            indexed = await indexed_everywhere(mesh, key, len(vectors), sequence)
            build = time.perf_counter() - started
            meter = common.CpuMeter(common.mesh_pids(mesh))
            settle_s = await settled(meter)
            results: dict[str, Any] = {
                "build_s": build,
                "upsert_s": upsert_s,
                "indexed_points": indexed,
                "settle_s": settle_s,
            }
            queries = len(data["queries"])
            for concurrency in args.concurrency:
                for case, condition in (("plain", None), ("filter10", FILTER_GROUPS)):
                    before = meter.sample()
                    figures = await searches(
                        stub, data, truth[case], condition, concurrency, args.ef
                    )
                    results[f"{case} c{concurrency}"] = _with_cpu(
                        figures, meter.delta(before, meter.sample()), queries
                    )
            for case in args.batch_cases:
                condition = FILTER_GROUPS if case == "filter10" else None
                for batch in args.batch:
                    for concurrency in args.batch_concurrency:
                        before = meter.sample()
                        figures = await batch_searches(
                            stub, data, truth[case], condition, batch, concurrency, args.ef
                        )
                        results[f"{case} batch{batch} c{concurrency}"] = _with_cpu(
                            figures, meter.delta(before, meter.sample()), queries
                        )
    return results


async def settled(meter: Any, limit_s: float = 180.0) -> float:
    """Waits until the vector service's processes are idle (under 5% of a
    core for a second, and at least 3 s after the build): the primary takes
    a base snapshot of a collection once its writes have been quiet for 2 s
    (replication.py), a tar of the whole shard that would otherwise share
    the first measured case's time. Returns the seconds waited."""
    started = time.perf_counter()
    await asyncio.sleep(3.0)
    while time.perf_counter() - started < limit_s:
        before = meter.sample()
        await asyncio.sleep(1.0)
        used = meter.delta(before, meter.sample())
        if sum(v for name, v in used.items() if name.startswith("vectors")) < 0.05:
            break
    return time.perf_counter() - started


def _with_cpu(figures: dict, cpu: dict[str, float], queries: int) -> dict:
    """``figures`` with the CPU seconds each process used meanwhile, and the
    vector service's processes' CPU per query (microseconds)."""
    service = sum(v for name, v in cpu.items() if name.startswith("vectors"))
    return figures | {"cpu_s": cpu, "service_cpu_us_per_query": service / queries * 1e6}


async def indexed_everywhere(mesh: Any, key: str, points: int, sequence: int) -> dict:
    """Waits until the primary holds the whole collection with no index
    build running (the engine leaves fewer than its indexing threshold of
    points, ~6.7k of 384-d, unindexed and searches them exactly), then until
    every replica has taken the primary's index (from its next base).
    Returns each instance's indexed count."""
    names = sorted(n for n in mesh.children if n.startswith("vectors"))
    indexed: dict[str, int] = {}
    for name in names:  # the primary ("vectors") first
        port = mesh.children[name].ports["port"]
        async with common.channel(f"127.0.0.1:{port}", api_key=key) as channel:
            stub = vectors_service_pb2_grpc.VectorServiceStub(channel)
            await stub.CountPoints(
                rpc.CountPointsRequest(collection="bench", min_write_sequence=sequence),
                timeout=600,
            )
            while True:
                state = (
                    await stub.GetCollection(rpc.GetCollectionRequest(collection="bench"))
                ).collection
                done = state.point_count == points and not state.indexing
                if done and state.indexed_point_count == indexed.get(
                    "vectors", state.indexed_point_count
                ):
                    indexed[name] = state.indexed_point_count
                    break
                await asyncio.sleep(0.25)
    return indexed


async def searches(
    stub: Any,
    data: dict[str, np.ndarray],
    truth: np.ndarray,
    groups: list[int] | None,
    concurrency: int,
    ef: int,
) -> dict:
    query_filter = _filter(groups)
    requests = [
        rpc.SearchRequest(
            collection="bench",
            vector=q.tolist(),
            top_k=K,
            filter=query_filter,
            params=rpc.SearchParams(hnsw_ef=ef),
        )
        for q in data["queries"]
    ]
    latencies: list[float] = []
    found: list[list[int]] = [[] for _ in requests]
    queue = iter(range(len(requests)))

    async def worker() -> None:
        for i in queue:
            t0 = time.perf_counter()
            reply = await stub.Search(requests[i])
            latencies.append(time.perf_counter() - t0)
            found[i] = [int(p.id) for p in reply.points]

    wall_start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summary(latencies, time.perf_counter() - wall_start, found, truth)


async def batch_searches(
    stub: Any,
    data: dict[str, np.ndarray],
    truth: np.ndarray,
    groups: list[int] | None,
    batch: int,
    concurrency: int,
    ef: int,
) -> dict:
    """The same queries, ``batch`` per SearchBatch call (each with the
    filter, if any); latencies per call."""
    queries = data["queries"]
    query_filter = _filter(groups)
    calls = [
        rpc.SearchBatchRequest(
            collection="bench",
            queries=[
                rpc.BatchQuery(vector=q.tolist(), top_k=K, filter=query_filter)
                for q in queries[i : i + batch]
            ],
            params=rpc.SearchParams(hnsw_ef=ef),
        )
        for i in range(0, len(queries), batch)
    ]
    latencies: list[float] = []
    found: list[list[int]] = [[] for _ in queries]
    queue = iter(range(len(calls)))

    async def worker() -> None:
        for i in queue:
            t0 = time.perf_counter()
            reply = await stub.SearchBatch(calls[i])
            latencies.append(time.perf_counter() - t0)
            for j, result in enumerate(reply.results):
                found[i * batch + j] = [int(p.id) for p in result.points]

    wall_start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    figures = summary(latencies, time.perf_counter() - wall_start, found, truth)
    figures["queries_per_s"] = len(queries) / (time.perf_counter() - wall_start)
    return figures


def _filter(groups: list[int] | None) -> Any:
    if not groups:
        return None
    return pb.Filter(
        must=[pb.Condition(key="group", any_of=pb.ValueList(values=[_number(g) for g in groups]))]
    )


def _number(value: int) -> Any:
    from google.protobuf import struct_pb2

    return struct_pb2.Value(number_value=value)


async def main(args: Any) -> int:
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    data = dataset(args.points, args.queries, args.dim)
    mask = np.isin(data["groups"], FILTER_GROUPS)
    truth = {
        "plain": exact_top(data["vectors"], data["queries"], None),
        "filter10": exact_top(data["vectors"], data["queries"], mask),
    }
    results: dict[str, Any] = {"direct": run_direct(data, args, truth)}
    print(f"direct: {results['direct']}", file=sys.stderr)
    for replicas in args.replicas:
        results[f"mesh r{replicas}"] = await run_mesh(data, args, truth, replicas)
        print(f"mesh r{replicas}: {results[f'mesh r{replicas}']}", file=sys.stderr)
    direct = results["direct"]
    rows = [["direct", "plain", direct["build_s"], *_row(direct["plain"], direct["plain"])]]
    rows.append(["direct", "filter10", "", *_row(direct["filter10"], direct["filter10"])])
    for batch in args.batch:
        figures = direct[f"plain batch{batch}"]
        rows.append(["direct", f"plain batch{batch}", "", *_row(figures, direct["plain"])])
    for name, result in results.items():
        if name == "direct":
            continue
        for case, figures in result.items():
            if isinstance(figures, dict) and "queries_per_s" in figures:
                base = direct[case.split()[0]]
                rows.append([name, case, result["build_s"], *_row(figures, base)])
    print(
        common.table(
            [
                "target",
                "case",
                "build s",
                "recall@10",
                "q/s",
                "p50 ms",
                "p99 ms",
                "x direct q/s",
                "cpu us/q",
            ],
            rows,
        )
    )
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    path = common.write_json(
        "vectors_search",
        args,
        {
            "environment": common.environment(args),
            "args": vars(args) | {"tmpdir": str(args.tmpdir)},
            "results": results,
        },
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _row(figures: dict, base: dict) -> list[Any]:
    return [
        figures["recall_at_10"],
        figures["queries_per_s"],
        figures["p50_ms"],
        figures["p99_ms"],
        figures["queries_per_s"] / base["queries_per_s"],
        figures.get("service_cpu_us_per_query", float("nan")),
    ]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse() -> Any:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ef", type=int, default=64)
    parser.add_argument("--replicas", type=_ints, default=[1, 2])
    parser.add_argument(
        "--concurrency", type=_ints, default=[1, 4], help="single queries in flight"
    )
    parser.add_argument(
        "--batch", type=_ints, default=[16, 64], help="queries per SearchBatch call"
    )
    parser.add_argument(
        "--batch-concurrency", type=_ints, default=[2, 4], help="SearchBatch calls in flight"
    )
    parser.add_argument(
        "--batch-cases",
        type=lambda s: [x for x in s.split(",") if x],
        default=["plain", "filter10"],
        help="batched cases: plain, filter10",
    )
    common.add_common_args(parser)
    parser.set_defaults(max_seconds=3600.0)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

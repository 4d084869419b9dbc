"""Materialize to Redis: mlmesh's Materialize operation (through Envoy, keys
on) against Feast's own ``FeatureStore.materialize`` on the same data, in
one run.

    .venv/bin/python bench/features_materialize.py [--rows 100000] [--features 20] \\
        [--chunk-events 50000] [--rounds 2]

The data: ``--rows`` entities with one event each (``--features`` float
columns), event times over the last day, in one parquet file. Both sides end
with the same online state: every entity's row in Redis (the machine's,
127.0.0.1:6379, database 12, flushed before each side).

- mlmesh: a mesh of the feature service and the gateway starts in a temp
  dir; a definition (a batch source over the parquet, a row view passing the
  features through) is applied, then ``Materialize`` is called and polled
  (every 20 ms) until done. Timed: the call to done (planning, reading the
  events, computing and writing every chunk, committing progress).
- feast: a plain Feast repository in a temp dir (file registry, the same
  parquet as a ``FileSource``, one ``FeatureView``, Redis online store, the
  default local compute engine); ``FeatureStore.materialize(start, end)``
  is timed, in this process.

The sides alternate over ``--rounds``; each run's rows are spot-checked in
Redis (a sample of entities read back: mlmesh through GetOnlineFeatures,
Feast through ``get_online_features``). Figures: seconds and rows/s per
side, and the ratio mlmesh/feast of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import tempfile
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import _common as common
import numpy as np
import pandas as pd
from google.protobuf import struct_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh.gateway.v1 import gateway_pb2

REDIS_DB = 12
REDIS = f"redis://127.0.0.1:6379/{REDIS_DB}"
VIEW = "bench_materialized"
SAMPLE = 50


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000, help="entities, one row each")
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument(
        "--chunk-events", type=int, default=50_000, help="mlmesh's chunk size, in events"
    )
    parser.add_argument("--rounds", type=int, default=2)
    common.add_common_args(parser)
    return parser.parse_args()


def data(rows: int, features: int, path: Path) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    now = pd.Timestamp.now(tz="UTC").floor("s")
    frame = pd.DataFrame(
        {
            "user_id": np.arange(1, rows + 1, dtype="int64"),
            "event_time": now - pd.to_timedelta(rng.integers(60, 86_400, rows), unit="s"),
        }
    )
    for i in range(features):
        frame[f"f{i:02d}"] = rng.uniform(0, 1000, rows).round(6)
    frame.to_parquet(path)
    return frame


def definitions(features: int, path: Path) -> str:
    columns = ", ".join(f"f{i:02d}: double" for i in range(features))
    rows = "\n".join(
        f"      - {{name: f{i:02d}, type: double, expression: f{i:02d}}}" for i in range(features)
    )
    head = textwrap.dedent(
        """\
        entities:
          - {{name: bench_user, join_key: user_id, value_type: int64}}
        sources:
          - name: bench_events
            kind: batch
            path: {path}
            timestamp_field: event_time
            columns: {{user_id: int64, {columns}}}
        feature_views:
          - name: {view}
            entities: [bench_user]
            source: bench_events
            features:
        """
    ).format(columns=columns, view=VIEW, path=path)
    return head + rows + "\n"


async def flush_redis() -> None:
    await asyncio.to_thread(
        subprocess.run,
        ["redis-cli", "-n", str(REDIS_DB), "flushdb"],
        check=True,
        capture_output=True,
    )


def _expected(frame: pd.DataFrame, users: list[int]) -> pd.DataFrame:
    return frame.set_index("user_id").loc[users]


async def mlmesh_round(stub: Any, frame: pd.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
    await flush_redis()
    started = time.perf_counter()
    operation = (
        await stub.Materialize(rpc.MaterializeRequest(feature_views=[VIEW]), timeout=60)
    ).operation
    while not operation.done:
        await asyncio.sleep(0.02)
        operation = (
            await stub.GetOperation(rpc.GetOperationRequest(name=operation.name), timeout=60)
        ).operation
    seconds = time.perf_counter() - started
    if operation.metadata.state != pb.OPERATION_STATE_SUCCEEDED:
        raise RuntimeError(f"Materialize ended {operation}")
    meta = operation.metadata
    users = random.Random(3).sample(range(1, args.rows + 1), SAMPLE)
    read = await stub.GetOnlineFeatures(
        rpc.GetOnlineFeaturesRequest(
            features=rpc.FeatureReferences(references=[f"{VIEW}:f00", f"{VIEW}:f07"]),
            entity_rows=[
                pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=u)}) for u in users
            ],
        ),
        timeout=60,
    )
    want = _expected(frame, users)
    for user, row in zip(users, read.rows, strict=True):
        got = (row.values[0].value.number_value, row.values[1].value.number_value)
        if got != (want.at[user, "f00"], want.at[user, "f07"]):
            raise RuntimeError(f"mlmesh: user {user} reads {got}")
    return {
        "seconds": round(seconds, 3),
        "rows": args.rows,
        "rows_per_s": args.rows / seconds,
        "chunks": meta.total_chunks,
        "rows_written": meta.rows_written,
        "operation_seconds": round(
            (meta.end_time.ToNanoseconds() - meta.create_time.ToNanoseconds()) / 1e9, 3
        ),
    }


def feast_repo(folder: Path, data_path: Path, features: int) -> Any:
    """A plain Feast repository (objects applied to a file registry)."""
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig, ValueType
    from feast.types import Float64, Int64

    config = RepoConfig(
        project="bench_feast",
        provider="local",
        registry=str(folder / "registry.db"),
        online_store={"type": "redis", "connection_string": f"127.0.0.1:6379,db={REDIS_DB}"},
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=str(folder),
    )
    store = FeatureStore(config=config)
    user = Entity(name="bench_user", join_keys=["user_id"], value_type=ValueType.INT64)
    source = FileSource(name="bench_events", path=str(data_path), timestamp_field="event_time")
    view = FeatureView(
        name=VIEW,
        entities=[user],
        ttl=timedelta(days=7),
        schema=[Field(name="user_id", dtype=Int64)]
        + [Field(name=f"f{i:02d}", dtype=Float64) for i in range(features)],
        source=source,
        online=True,
    )
    store.apply([user, source, view])
    return store


def feast_round(store: Any, frame: pd.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
    subprocess.run(["redis-cli", "-n", str(REDIS_DB), "flushdb"], check=True, capture_output=True)
    end = datetime.now(UTC)
    started = time.perf_counter()
    store.materialize(start_date=end - timedelta(days=2), end_date=end, feature_views=[VIEW])
    seconds = time.perf_counter() - started
    users = random.Random(3).sample(range(1, args.rows + 1), SAMPLE)
    read = store.get_online_features(
        features=[f"{VIEW}:f00", f"{VIEW}:f07"], entity_rows=[{"user_id": u} for u in users]
    ).to_dict()
    want = _expected(frame, users)
    if read["f00"] != list(want["f00"]) or read["f07"] != list(want["f07"]):
        raise RuntimeError("feast: wrong values read back")
    return {"seconds": round(seconds, 3), "rows": args.rows, "rows_per_s": args.rows / seconds}


async def main(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {
        "environment": common.environment(args),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))},
        "mlmesh": [],
        "feast": [],
    }
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        data_path = folder / "events.parquet"
        frame = await asyncio.to_thread(data, args.rows, args.features, data_path)
        feast_folder = folder / "feast_repo"
        feast_folder.mkdir()
        feast = await asyncio.to_thread(feast_repo, feast_folder, data_path, args.features)
        os.environ["MLMESH_FEATURES_ONLINE_STORE"] = REDIS
        os.environ["MLMESH_FEATURES_MATERIALIZE_CHUNK_EVENTS"] = str(args.chunk_events)
        async with common.running_mesh(args, ("features", "gateway")) as (mesh, ready, _):
            target = ready["address"]
            secret = await common.app_key(
                target, mesh.admin_key(), gateway_pb2.PLATFORM_SERVICE_FEATURES
            )
            async with common.channel(target, api_key=secret) as channel:
                stub = features_service_pb2_grpc.FeatureServiceStub(channel)
                await stub.ApplyFeatureDefinitions(
                    rpc.ApplyFeatureDefinitionsRequest(
                        source=definitions(args.features, data_path)
                    ),
                    timeout=300,
                )
                for r in range(args.rounds):
                    sides = ["mlmesh", "feast"] if r % 2 == 0 else ["feast", "mlmesh"]
                    for side in sides:
                        if side == "mlmesh":
                            out = await mlmesh_round(stub, frame, args)
                        else:
                            out = await asyncio.to_thread(feast_round, feast, frame, args)
                        results[side].append(out)
                        print(
                            f"round {r + 1} {side}: {out['seconds']:.2f} s, "
                            f"{out['rows_per_s']:.0f} rows/s",
                            flush=True,
                        )
        await flush_redis()
    medians = {
        side: common.median([run["rows_per_s"] for run in results[side]])
        for side in ("mlmesh", "feast")
    }
    results["median_rows_per_s"] = medians
    results["ratio_mlmesh_over_feast"] = medians["mlmesh"] / medians["feast"]
    print()
    print(
        common.table(
            ["side", "rows", "median s", "median rows/s"],
            [
                [
                    side,
                    args.rows,
                    common.median([run["seconds"] for run in results[side]]),
                    medians[side],
                ]
                for side in ("mlmesh", "feast")
            ],
        )
    )
    print(f"\nratio mlmesh/feast (rows/s): {results['ratio_mlmesh_over_feast']:.2f}x")
    print(f"results: {common.write_json('features_materialize', args, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run(main, parse()))

"""The vector service killed with SIGKILL while it takes upserts: after a
restart every acknowledged point is there, the collection opens cleanly, and
a retry of the batch that was in flight is safe."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_VECTORS
from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh.vectors.v1 import vectors_service_pb2 as rpc
from mlmesh.vectors.v1 import vectors_service_pb2_grpc
from mlmesh_chassis.testing import bootstrap_keys_file, keyed_channel

DIM = 32
BATCH = 200


def spawn(tmp_path: Path, keys: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp_path / "port.json"
    port_file.unlink(missing_ok=True)
    env = {
        **os.environ,
        "MLMESH_VECTORS_ROOT": str(tmp_path / "vectors"),
        "MLMESH_VECTORS_PORT_FILE": str(port_file),
        "MLMESH_VECTORS_BOOTSTRAP_KEYS_FILE": str(keys),
        "MLMESH_VECTORS_METRICS_PORT": "-1",
    }
    with (tmp_path / "service.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlmesh_vectors"], env=env, stdout=log, stderr=log
        )
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert process.poll() is None, (tmp_path / "service.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    return process, json.loads(port_file.read_text())["port"]


def batch(start: int) -> list[pb.Point]:
    rng = np.random.default_rng(start)
    vectors = rng.normal(size=(BATCH, DIM))
    return [pb.Point(id=f"p-{start + i}", vector=vectors[i].tolist()) for i in range(BATCH)]


async def test_acknowledged_points_survive_sigkill(tmp_path):
    keys, secret = bootstrap_keys_file(tmp_path, [PLATFORM_SERVICE_VECTORS])
    process, port = spawn(tmp_path, keys)
    acknowledged: list[int] = []
    enough = asyncio.Event()
    in_flight = -1
    try:
        async with keyed_channel(f"127.0.0.1:{port}", secret) as channel:
            stub = vectors_service_pb2_grpc.VectorServiceStub(channel)
            await stub.CreateCollection(
                rpc.CreateCollectionRequest(
                    collection=pb.Collection(
                        name="crash", dimension=DIM, distance=pb.DISTANCE_EUCLID
                    )
                )
            )

            async def write_forever() -> None:
                nonlocal in_flight
                start = 0
                while True:
                    in_flight = start
                    await stub.UpsertPoints(
                        rpc.UpsertPointsRequest(collection="crash", points=batch(start))
                    )
                    acknowledged.append(start)
                    if len(acknowledged) >= 15:
                        enough.set()
                    start += BATCH

            writer = asyncio.ensure_future(write_forever())
            await enough.wait()
            process.send_signal(signal.SIGKILL)
            try:
                await writer
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        process.kill()
        process.wait()
    process, port = spawn(tmp_path, keys)
    try:
        async with keyed_channel(f"127.0.0.1:{port}", secret) as channel:
            stub = vectors_service_pb2_grpc.VectorServiceStub(channel)
            total = (await stub.CountPoints(rpc.CountPointsRequest(collection="crash"))).count
            # Every acknowledged batch; the one in flight wholly or not at all.
            assert total in (len(acknowledged) * BATCH, (len(acknowledged) + 1) * BATCH)
            for start in acknowledged:
                got = await stub.GetPoints(
                    rpc.GetPointsRequest(
                        collection="crash", ids=[f"p-{start}", f"p-{start + BATCH - 1}"]
                    )
                )
                assert len(got.points) == 2, start
            # Retrying the batch that was in flight is safe.
            await stub.UpsertPoints(
                rpc.UpsertPointsRequest(collection="crash", points=batch(in_flight))
            )
            total = (await stub.CountPoints(rpc.CountPointsRequest(collection="crash"))).count
            assert total == (len(acknowledged) + 1) * BATCH
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0

"""The same job on a two-node Ray cluster: `ray start --head` plus a second
`ray start` on this machine (token auth on), and a batch service pointed at
it by setting alone."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from batchkit import batch_settings, start_batch, stop_batch
from mlmesh.batch.v1 import batch_pb2 as pb
from mlmesh.batch.v1 import batch_service_pb2 as rpc
from mlmesh_batch.cluster import _free_port, ray_executable
from mlmesh_batch.demo import write_sentences
from test_batch_faults import assert_complete, ids_of
from test_batch_jobs import embed_stage, job, run_to_end

NODES_TIMEOUT_S = 120


def alive_nodes(address: str, env: dict[str, str]) -> int:
    """Alive nodes, asked from a separate driver process."""
    code = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


@pytest.fixture
def two_nodes(tmp_path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    token = tmp_path / "ray-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    nodes = []
    with (tmp_path / "nodes.log").open("ab") as log:
        nodes.append(
            subprocess.Popen(
                [
                    ray_executable(),
                    "start",
                    "--head",
                    f"--port={port}",
                    "--include-dashboard=false",
                    *common,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        time.sleep(3)
        nodes.append(
            subprocess.Popen(
                [ray_executable(), "start", f"--address={address}", *common],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        deadline = time.monotonic() + NODES_TIMEOUT_S
        while alive_nodes(address, env) < 2:
            assert time.monotonic() < deadline, (tmp_path / "nodes.log").read_text()[-3000:]
            time.sleep(1)
        yield address, token, env
    finally:
        for node in reversed(nodes):
            node.send_signal(signal.SIGINT)
        for node in reversed(nodes):
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


@pytest.mark.timeout(600)
async def test_the_same_job_runs_on_a_two_node_cluster(tmp_path, registry, two_nodes):
    address, token, env = two_nodes
    (tmp_path / "data").mkdir()
    settings, secret = batch_settings(
        tmp_path, registry, ray_address=address, ray_token_file=token, cores=1
    )
    running, channel = await start_batch(settings, secret, tmp_path / "data")
    try:
        source = write_sentences(tmp_path / "data" / "in.parquet", 800, seed=21)
        output = tmp_path / "data" / "out"
        spec = job(source, output, [embed_stage(batch_size=32, concurrency=2)], keep_columns=[])
        final = await run_to_end(running.stub, rpc.CreateJobRequest(job=spec))
        assert final.state == pb.JOB_STATE_SUCCEEDED, final
        assert_complete(output, ids_of(source))
        assert alive_nodes(address, env) == 2
        # The service started no Ray of its own.
        assert not (settings.root / "ray" / "head.json").exists()
    finally:
        await stop_batch(running, channel)

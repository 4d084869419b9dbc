"""Triton's queue and compute figures on the deployer's /metrics, from a
real tritonserver (the one scripts/setup.sh provisions) serving a tiny
python-backend model."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlmesh_chassis.metrics import REGISTRY
from mlmesh_deployer.telemetry import export_triton_stats
from mlmesh_inference.triton import TritonClient
from mlmesh_runner.supervisor import listening_ports
from mlmesh_triton import registration as triton_registration

MODEL = (
    "import os, sys\n"
    "sys.path[:0] = [p for p in os.environ.get('MLMESH_TRITON_PYTHONPATH', '').split(':') if p]\n"
    "import triton_python_backend_utils as pb_utils\n"
    "class TritonPythonModel:\n"
    "    def execute(self, requests):\n"
    "        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor('y',\n"
    "            pb_utils.get_input_tensor_by_name(r, 'x').as_numpy())]) for r in requests]\n"
)
CONFIG = (
    'name: "echo"\nbackend: "python"\nmax_batch_size: 4\n'
    'input [{ name: "x", data_type: TYPE_FP32, dims: [ 2 ] }]\n'
    'output [{ name: "y", data_type: TYPE_FP32, dims: [ 2 ] }]\n'
    "instance_group [{ kind: KIND_CPU, count: 1 }]\n"
)


@pytest.fixture
def triton(tmp_path: Path) -> Iterator[str]:
    home = triton_registration._triton_home()
    binary = home / "triton" / "bin" / "tritonserver"
    if not binary.is_file():
        pytest.fail(f"no Triton at {binary}: run scripts/setup.sh")
    (tmp_path / "repo" / "echo" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "echo" / "config.pbtxt").write_text(CONFIG)
    (tmp_path / "repo" / "echo" / "1" / "model.py").write_text(MODEL)
    env = {
        **os.environ,
        "PATH": "/usr/bin:/bin",
        "LD_LIBRARY_PATH": str(home / "triton" / "lib"),
        "MLMESH_TRITON_PYTHONPATH": str(
            home / "triton-models" / "lib" / "python3.11" / "site-packages"
        ),
    }
    log = (tmp_path / "triton.log").open("w")
    process = subprocess.Popen(
        [
            str(binary),
            f"--model-repository={tmp_path / 'repo'}",
            f"--backend-directory={home / 'triton' / 'backends'}",
            "--model-control-mode=explicit",
            "--load-model=echo",
            "--grpc-port=0",
            "--grpc-address=127.0.0.1",
            "--allow-http=false",
            "--allow-metrics=false",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not (ports := listening_ports(process.pid)):
            assert process.poll() is None, (tmp_path / "triton.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Triton did not listen in 120 s"
            time.sleep(0.1)
        yield f"127.0.0.1:{min(ports)}"
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(15)
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def _sample(name: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model": "echo", "version": "1"})


async def test_queue_and_compute_time_per_model_version_from_triton(triton: str) -> None:
    close = export_triton_stats(triton)
    try:
        async with TritonClient(triton) as client:
            for _ in range(200):  # Triton loads the model after it listens
                if await client.model_ready("echo"):
                    break
                await asyncio.sleep(0.1)
            before = _sample("mlmesh_triton_queued_requests_total") or 0.0
            for _ in range(3):
                outputs = await client.infer("echo", {"x": np.ones((1, 2), np.float32)})
                assert outputs.outputs["y"].tolist() == [[1.0, 1.0]]
        assert REGISTRY.get_sample_value("mlmesh_triton_stats_up") == 1
        assert _sample("mlmesh_triton_queued_requests_total") == before + 3
        assert _sample("mlmesh_triton_requests_succeeded_total") == before + 3
        assert (_sample("mlmesh_triton_queue_seconds_total") or 0.0) > 0
        assert (_sample("mlmesh_triton_compute_seconds_total") or 0.0) > 0
        assert _sample("mlmesh_triton_requests_failed_total") == 0
    finally:
        await close()
    assert REGISTRY.get_sample_value("mlmesh_triton_stats_up") is None


async def test_triton_down_reads_as_not_up_without_raising() -> None:
    close = export_triton_stats("127.0.0.1:1")
    try:
        assert REGISTRY.get_sample_value("mlmesh_triton_stats_up") == 0
        assert _sample("mlmesh_triton_queued_requests_total") is None
    finally:
        await close()

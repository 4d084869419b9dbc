"""Faults: cancel and resume, a model actor killed, the service killed and
restarted mid-job. Each checks the output against the input ids: no row lost,
none written twice."""

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
import pyarrow.parquet as pq
import pytest
from batchkit import batch_settings
from mlmesh.batch.v1 import batch_pb2 as pb
from mlmesh.batch.v1 import batch_service_pb2 as rpc
from mlmesh.batch.v1 import batch_service_pb2_grpc
from mlmesh_batch.demo import write_sentences
from mlmesh_chassis.testing import keyed_channel
from test_batch_jobs import JOB_TIMEOUT_S, embed_stage, job, read_output, run_to_end


async def wait_for(stub, name: str, predicate, timeout_s: float = JOB_TIMEOUT_S) -> pb.Job:
    deadline = time.monotonic() + timeout_s
    while True:
        current = (await stub.GetJob(rpc.GetJobRequest(name=name))).job
        if predicate(current):
            return current
        assert time.monotonic() < deadline, f"timed out; last: {current}"
        await asyncio.sleep(0.2)


def ids_of(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def assert_complete(output: Path, expected: list[str]) -> None:
    written = read_output(output).column("id").to_pylist()
    assert len(written) == len(set(written)), "a row was written twice"
    assert sorted(written) == sorted(expected), "a row is missing"


@pytest.mark.timeout(600)
async def test_cancel_stops_within_seconds_and_a_resume_ends_equal_to_an_uninterrupted_run(batch):
    source = write_sentences(batch.data / "cancel" / "in.parquet", 1600, seed=11)
    expected = ids_of(source)
    output = batch.data / "cancel" / "out"
    spec = job(source, output, [embed_stage(batch_size=32, concurrency=1)], keep_columns=[])
    created = await batch.stub.CreateJob(rpc.CreateJobRequest(job=spec))
    name = created.operation.name
    await wait_for(batch.stub, name, lambda j: j.progress.rows_done >= 200)
    asked = time.monotonic()
    await batch.stub.CancelJob(rpc.CancelJobRequest(name=name))
    stopped = await wait_for(batch.stub, name, lambda j: j.state == pb.JOB_STATE_CANCELLED, 15)
    assert time.monotonic() - asked < 5.0
    assert stopped.error.code == grpc.StatusCode.CANCELLED.value[0]
    done_before = stopped.progress.rows_done
    assert 0 < done_before < 1600
    # Cancelling again changes nothing.
    again = await batch.stub.CancelJob(rpc.CancelJobRequest(name=name))
    assert again.job.state == pb.JOB_STATE_CANCELLED

    resumed = await run_to_end(batch.stub, rpc.CreateJobRequest(resume_from=name))
    assert resumed.state == pb.JOB_STATE_SUCCEEDED, resumed
    assert resumed.resumed_from == name
    assert resumed.progress.rows_skipped >= done_before
    assert resumed.progress.rows_done == 1600
    assert_complete(output, expected)

    # The same job run without a break writes the same rows.
    whole = batch.data / "cancel" / "whole"
    spec.output_uri = f"file://{whole}"
    uninterrupted = await run_to_end(batch.stub, rpc.CreateJobRequest(job=spec))
    assert uninterrupted.state == pb.JOB_STATE_SUCCEEDED
    a, b = read_output(output), read_output(whole)
    by_id = dict(zip(b.column("id").to_pylist(), b.column("embedding").to_pylist(), strict=True))
    for row_id, vector in zip(
        a.column("id").to_pylist(), a.column("embedding").to_pylist(), strict=True
    ):
        assert np.allclose(vector, by_id[row_id], atol=1e-5)
    # A finished job does not resume; nor does another key's.
    from mlmesh_chassis.testing import expect_error

    await expect_error(
        batch.stub.CreateJob(rpc.CreateJobRequest(resume_from=f"jobs/{uninterrupted.name[5:]}")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


def model_actor_pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"MapWorker" in cmdline and b"ModelStage" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(600)
async def test_a_killed_model_actor_loses_no_row_and_writes_none_twice(batch):
    source = write_sentences(batch.data / "actor" / "in.parquet", 2400, seed=12)
    output = batch.data / "actor" / "out"
    spec = job(source, output, [embed_stage(batch_size=32, concurrency=1)], keep_columns=[])
    created = await batch.stub.CreateJob(rpc.CreateJobRequest(job=spec))
    name = created.operation.name
    await wait_for(batch.stub, name, lambda j: j.progress.rows_done >= 200)
    pids = model_actor_pids()
    assert pids, "no model actor found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    final = await wait_for(
        batch.stub, name, lambda j: j.state not in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    )
    assert final.state == pb.JOB_STATE_SUCCEEDED, final
    assert final.progress.rows_done == 2400
    assert_complete(output, ids_of(source))


class ServiceProcess:
    """The batch service as a process of its own (to be killed for real)."""

    def __init__(self, settings, secret: str, log: Path) -> None:
        self.settings = settings
        self.secret = secret
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.port_file = settings.root.parent / "port"

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        env = {**os.environ}
        values = self.settings.model_dump(exclude_none=True)
        values["port_file"] = str(self.port_file)
        for key, value in values.items():
            env[f"MLMESH_BATCH_{key.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlmesh_batch"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def channel(self) -> grpc.aio.Channel:
        deadline = time.monotonic() + 60
        while not (self.port_file.exists() and self.port_file.read_text().strip()):
            assert self.process is not None and self.process.poll() is None, self.log.read_text()[
                -3000:
            ]
            assert time.monotonic() < deadline, "the service did not start"
            await asyncio.sleep(0.1)
        port = json.loads(self.port_file.read_text())["port"]
        return keyed_channel(f"127.0.0.1:{port}", self.secret)

    def stop(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=60)


@pytest.mark.timeout(600)
async def test_the_service_killed_mid_job_reattaches_and_a_restart_resumes(tmp_path, registry):
    (tmp_path / "data").mkdir()
    settings, secret = batch_settings(tmp_path, registry, part_rows=100)
    source = write_sentences(tmp_path / "data" / "in.parquet", 3000, seed=13)
    output = tmp_path / "data" / "out"
    service = ServiceProcess(settings, secret, tmp_path / "service.log")
    service.start()
    try:
        async with await service.channel() as channel:
            stub = batch_service_pb2_grpc.BatchServiceStub(channel)
            spec = job(source, output, [embed_stage(batch_size=32, concurrency=1)], keep_columns=[])
            name = (await stub.CreateJob(rpc.CreateJobRequest(job=spec))).operation.name
            running = await wait_for(stub, name, lambda j: j.progress.rows_done >= 100)
            assert running.attempts == 1
        # Killed: its driver (a process of its own) goes on.
        service.stop(signal.SIGKILL)
        service.start()
        async with await service.channel() as channel:
            stub = batch_service_pb2_grpc.BatchServiceStub(channel)
            seen = (await stub.GetJob(rpc.GetJobRequest(name=name))).job
            later = await wait_for(
                stub, name, lambda j: j.progress.rows_done > seen.progress.rows_done
            )
            assert later.attempts == 1  # re-attached, not restarted
        # Stopped gracefully: the driver stops too, and the next start resumes it.
        service.stop(signal.SIGTERM)
        service.start()
        async with await service.channel() as channel:
            stub = batch_service_pb2_grpc.BatchServiceStub(channel)
            final = await wait_for(
                stub, name, lambda j: j.state not in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
            )
            assert final.state == pb.JOB_STATE_SUCCEEDED, final
            assert final.attempts == 2
            assert final.progress.rows_done == 3000
        assert_complete(output, ids_of(source))
    finally:
        if service.process is not None and service.process.poll() is None:
            service.stop(signal.SIGTERM)

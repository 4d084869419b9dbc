"""Batch inference in the mesh, through Envoy with keys: the README's demo
command (the CLI embedding the dataset `make run` writes, with its progress),
an online stage calling the gateway with the job's key, rows metered per key,
and the BATCH scope."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from meshkit import usage_buckets
from mlmesh.batch.v1 import batch_pb2 as pb
from mlmesh.batch.v1 import batch_service_pb2 as rpc
from mlmesh.batch.v1 import batch_service_pb2_grpc
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.gateway.v1 import gateway_pb2, key_service_pb2_grpc, usage_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh_chassis.testing import expect_error
from mlmesh_sdk.channel import mesh_channel

ROOT = Path(__file__).resolve().parents[1]


def read_parts(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))])


@pytest.mark.timeout(420)
async def test_the_readme_demo_embeds_the_dataset_with_progress(full_mesh):
    data = full_mesh.state_dir / "batch" / "data" / "demo" / "sentences.parquet"
    deadline = time.monotonic() + 60
    while not data.exists():  # written by the service as it starts
        assert time.monotonic() < deadline, "no demo dataset"
        await asyncio.sleep(0.5)
    output = full_mesh.state_dir / "batch" / "output" / "demo-minilm"
    env = {**os.environ, "MLMESH_API_KEY": full_mesh.api_key, "MLMESH_TARGET": full_mesh.address}
    result = await asyncio.to_thread(
        subprocess.run,
        [
            str(Path(sys.executable).with_name("mlmesh")),
            "batch",
            "embed",
            "--input",
            str(data),
            "--output",
            str(output),
            "--model",
            "minilm@champion",
            "--keep",
            "text",
            "--progress",  # drawn on a terminal by itself; stderr is a pipe here
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rows" in result.stderr and "%" in result.stderr  # the progress line
    assert str(output) in result.stdout and "succeeded" in result.stdout
    table = read_parts(output)
    assert table.num_rows == pq.read_metadata(data).num_rows
    assert len(set(table.column("id").to_pylist())) == table.num_rows
    assert table.column("embedding_model").to_pylist()[0].startswith("minilm@")


@pytest.mark.timeout(420)
async def test_an_online_stage_calls_the_gateway_with_the_jobs_key_and_rows_are_metered(
    full_mesh,
):
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        made = await keys.CreateKey(
            keys_rpc.CreateKeyRequest(
                key=gateway_pb2.Key(
                    display_name="batch caller",
                    scopes=gateway_pb2.KeyScopes(
                        services=[
                            gateway_pb2.PLATFORM_SERVICE_BATCH,
                            gateway_pb2.PLATFORM_SERVICE_EMBED,
                        ]
                    ),
                )
            )
        )
        embed_only = await keys.CreateKey(
            keys_rpc.CreateKeyRequest(
                key=gateway_pb2.Key(
                    display_name="embed only",
                    scopes=gateway_pb2.KeyScopes(services=[gateway_pb2.PLATFORM_SERVICE_EMBED]),
                )
            )
        )
    folder = full_mesh.state_dir / "batch" / "data" / "online"
    folder.mkdir(parents=True, exist_ok=True)
    texts = [f"sentence number {i} about the sea" for i in range(60)]
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)]
    lines.insert(30, "{broken")
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    stage = pb.Stage(
        name="embed",
        model=pb.ModelStage(
            model=ModelReference(model="minilm", alias="champion"),
            task=pb.TASK_EMBED,
            input_column="text",
            output_column="embedding",
            execution=pb.EXECUTION_ONLINE,
            batch_size=16,
            concurrency=2,
        ),
    )
    job = pb.Job(
        input_uri=f"file://{folder / 'in.jsonl'}",
        input_format=pb.DATA_FORMAT_JSONL,
        id_column="id",
        keep_columns=["text"],
        stages=[stage],
        output_uri=f"file://{folder / 'out'}",
    )
    async with mesh_channel(full_mesh.address, made.secret) as channel:
        stub = batch_service_pb2_grpc.BatchServiceStub(channel)
        created = await stub.CreateJob(rpc.CreateJobRequest(job=job, request_id="online-1"))
        # The same request again is the same job, not a second one.
        again = await stub.CreateJob(rpc.CreateJobRequest(job=job, request_id="online-1"))
        assert again.operation.name == created.operation.name
        final = None
        async with asyncio.timeout(400):
            async for update in stub.WatchJob(rpc.WatchJobRequest(name=created.operation.name)):
                final = update.job
    assert final is not None and final.state == pb.JOB_STATE_SUCCEEDED_WITH_ERRORS, final
    assert (final.progress.rows_done, final.progress.rows_failed) == (60, 1)
    table = read_parts(folder / "out")
    assert sorted(table.column("id").to_pylist()) == list(range(60))
    # The gateway's MiniLM (on Triton) gives what the model gives in process.
    from mlmesh_triton.build import minilm_folder
    from mlmesh_triton.sentence_encoder import SentenceEncoder

    by_id = dict(
        zip(table.column("id").to_pylist(), table.column("embedding").to_pylist(), strict=True)
    )
    direct, _ = SentenceEncoder(str(minilm_folder())).encode([texts[0], texts[59]])
    assert np.allclose([by_id[0], by_id[59]], direct, atol=1e-4)
    error_part = next((folder / "out" / "_errors").glob("*.jsonl"))
    errors = [json.loads(line) for line in error_part.read_text().splitlines()]
    assert errors[0]["stage"] == "read" and errors[0]["reason"] == "INPUT_INVALID"

    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        deadline = time.monotonic() + 20
        while True:
            buckets = await usage_buckets(usage, made.key.id)
            # Rows are billed per committed part, under the stage's model
            # (the calls themselves are billed apart, under no model).
            batch_rows = sum(
                b.usage.input_items
                for b in buckets
                if b.service == gateway_pb2.PLATFORM_SERVICE_BATCH and b.model == "minilm"
            )
            embeds = sum(
                b.request_count for b in buckets if b.service == gateway_pb2.PLATFORM_SERVICE_EMBED
            )
            if batch_rows >= 61 and embeds >= 1:
                break
            assert time.monotonic() < deadline, buckets
            await asyncio.sleep(0.3)
        assert batch_rows == 61  # every row processed, the failed one too, once

    async with mesh_channel(full_mesh.address, embed_only.secret) as channel:
        stub = batch_service_pb2_grpc.BatchServiceStub(channel)
        details = await expect_error(
            stub.ListJobs(rpc.ListJobsRequest()), grpc.StatusCode.PERMISSION_DENIED
        )
        assert details.error_info.metadata["service"] == "BATCH"
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        stub = batch_service_pb2_grpc.BatchServiceStub(channel)
        # Another key's job is not found (not forbidden: its name says nothing).
        await expect_error(
            stub.GetJob(rpc.GetJobRequest(name=created.operation.name)), grpc.StatusCode.NOT_FOUND
        )

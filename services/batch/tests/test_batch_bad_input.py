"""Jobs that cannot run are refused at CreateJob with a clear status and
details, and nothing is written: no job row, no output, no driver."""

from __future__ import annotations

from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.protobuf import struct_pb2
from mlmesh.batch.v1 import batch_pb2 as pb
from mlmesh.batch.v1 import batch_service_pb2 as rpc
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh_chassis.testing import expect_error
from test_batch_jobs import embed_stage, job, normalize_stage

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture
def folder(batch, request) -> Path:
    path = batch.data / f"bad-{request.node.name[:40]}"
    path.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), path / "in.parquet")
    return path


async def job_count(batch) -> int:
    listed = await batch.stub.ListJobs(rpc.ListJobsRequest(page_size=1000))
    return len(listed.jobs)


async def refused(batch, folder: Path, request: rpc.CreateJobRequest, code: grpc.StatusCode):
    before = await job_count(batch)
    details = await expect_error(batch.stub.CreateJob(request), code)
    assert await job_count(batch) == before
    assert not (folder / "out").exists()
    return details


async def test_a_missing_input_is_refused(batch, folder):
    request = rpc.CreateJobRequest(
        job=job(folder / "nothing.parquet", folder / "out", [embed_stage()])
    )
    details = await refused(batch, folder, request, INVALID)
    assert details.error_info.reason == "INPUT_INVALID"
    assert details.bad_request.field_violations[0].field == "job.input_uri"


async def test_an_unreadable_file_is_refused(batch, folder):
    (folder / "junk.parquet").write_bytes(b"this is not parquet at all")
    request = rpc.CreateJobRequest(
        job=job(folder / "junk.parquet", folder / "out", [embed_stage()])
    )
    details = await refused(batch, folder, request, INVALID)
    assert details.error_info.reason == "INPUT_INVALID"
    assert "not readable parquet" in details.message


async def test_a_json_lines_file_that_is_not_json_is_refused(batch, folder):
    (folder / "junk.jsonl").write_text("{not json\n")
    request = rpc.CreateJobRequest(job=job(folder / "junk.jsonl", folder / "out", [embed_stage()]))
    details = await refused(batch, folder, request, INVALID)
    assert details.error_info.reason == "INPUT_INVALID"


async def test_a_schema_without_the_needed_column_is_refused(batch, folder):
    request = rpc.CreateJobRequest(
        job=job(folder / "in.parquet", folder / "out", [embed_stage(column="body")])
    )
    details = await refused(batch, folder, request, INVALID)
    assert details.error_info.reason == "INPUT_INVALID"
    assert details.error_info.metadata["column"] == "body"
    assert details.bad_request.field_violations[0].field == "job.stages[0].input_column"
    missing_id = job(folder / "in.parquet", folder / "out", [embed_stage()])
    missing_id.id_column = "key"
    details = await refused(batch, folder, rpc.CreateJobRequest(job=missing_id), INVALID)
    assert details.bad_request.field_violations[0].field == "job.id_column"


async def test_an_unknown_model_is_refused(batch, folder):
    stage = embed_stage()
    stage.model.model.CopyFrom(ModelReference(model="no-such-model", alias="champion"))
    request = rpc.CreateJobRequest(job=job(folder / "in.parquet", folder / "out", [stage]))
    details = await refused(batch, folder, request, NOT_FOUND)
    assert details.error_info.reason == "MODEL_NOT_FOUND"
    unknown_alias = embed_stage()
    unknown_alias.model.model.CopyFrom(ModelReference(model="minilm", alias="nope"))
    request = rpc.CreateJobRequest(job=job(folder / "in.parquet", folder / "out", [unknown_alias]))
    await refused(batch, folder, request, NOT_FOUND)


async def test_an_unknown_callable_or_bad_parameters_are_refused(batch, folder):
    stage = normalize_stage()
    stage.callable.function = "text.shout"
    request = rpc.CreateJobRequest(job=job(folder / "in.parquet", folder / "out", [stage]))
    details = await refused(batch, folder, request, NOT_FOUND)
    assert details.error_info.reason == "CALLABLE_NOT_FOUND"
    bad = normalize_stage(lowercase="yes", colour=1)
    request = rpc.CreateJobRequest(job=job(folder / "in.parquet", folder / "out", [bad]))
    details = await refused(batch, folder, request, INVALID)
    fields = {v.field for v in details.bad_request.field_violations}
    assert "job.stages[0].callable.parameters.colour" in fields


async def test_uris_outside_the_allowed_folders_are_refused(batch, folder):
    for uri_field, value in [
        ("input_uri", "file:///etc/passwd"),
        ("input_uri", f"file://{folder}/../../../../etc/hostname"),
        ("input_uri", "http://example.com/x.parquet"),
        ("output_uri", "file:///tmp/elsewhere"),
        ("input_uri", f"file://{folder}/in.parquet\n"),
    ]:
        spec = job(folder / "in.parquet", folder / "out", [embed_stage()])
        setattr(spec, uri_field, value)
        details = await refused(batch, folder, rpc.CreateJobRequest(job=spec), INVALID)
        assert details.bad_request.field_violations[0].field == f"job.{uri_field}"
        assert "/etc/passwd" not in details.message or len(details.message) < 400


async def test_a_non_empty_output_and_bad_stage_shapes_are_refused(batch, folder):
    (folder / "full").mkdir()
    (folder / "full" / "part-000001.parquet").write_bytes(b"x")
    spec = job(folder / "in.parquet", folder / "full", [embed_stage()])
    details = await expect_error(batch.stub.CreateJob(rpc.CreateJobRequest(job=spec)), INVALID)
    assert details.bad_request.field_violations[0].field == "job.output_uri"
    twice = job(folder / "in.parquet", folder / "out", [embed_stage(), embed_stage()])
    details = await refused(batch, folder, rpc.CreateJobRequest(job=twice), INVALID)
    assert details.bad_request.field_violations[0].field == "job.stages[1].name"
    generate_in_process = embed_stage(task=pb.TASK_GENERATE, execution=pb.EXECUTION_IN_PROCESS)
    request = rpc.CreateJobRequest(
        job=job(folder / "in.parquet", folder / "out", [generate_in_process])
    )
    details = await refused(batch, folder, request, INVALID)
    assert "execution" in details.bad_request.field_violations[0].field
    params = struct_pb2.Struct()
    params.update({"max_tokens": 5})
    embed_with_params = embed_stage(parameters=params)
    request = rpc.CreateJobRequest(
        job=job(folder / "in.parquet", folder / "out", [embed_with_params])
    )
    await refused(batch, folder, request, INVALID)


async def test_contract_rules_are_checked_before_anything(batch, folder):
    spec = job(folder / "in.parquet", folder / "out", [embed_stage()])
    spec.id_column = "id\n"
    await refused(batch, folder, rpc.CreateJobRequest(job=spec), INVALID)
    await expect_error(batch.stub.GetJob(rpc.GetJobRequest(name="jobs/../x")), INVALID)
    await expect_error(batch.stub.GetJob(rpc.GetJobRequest(name="jobs/abc")), NOT_FOUND)
    await expect_error(batch.stub.ListJobs(rpc.ListJobsRequest(page_token="garbage!")), INVALID)

"""Batch jobs end to end on the service in process: a real registry, a real
local Ray head, the minilm and digits builds run by the serving code."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.protobuf import struct_pb2
from mlmesh.batch.v1 import batch_pb2 as pb
from mlmesh.batch.v1 import batch_service_pb2 as rpc
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh_batch.demo import sentences

JOB_TIMEOUT_S = 240


def embed_stage(name: str = "embed", column: str = "text", **fields: Any) -> pb.Stage:
    return pb.Stage(
        name=name,
        model=pb.ModelStage(
            **{
                "model": ModelReference(model="minilm", alias="champion"),
                "task": pb.TASK_EMBED,
                "input_column": column,
                "output_column": "embedding",
                **fields,
            }
        ),
    )


def normalize_stage(**params: Any) -> pb.Stage:
    struct = struct_pb2.Struct()
    struct.update(params)
    return pb.Stage(
        name="clean",
        callable=pb.CallableStage(
            function="text.normalize", input_column="text", output_column="text", parameters=struct
        ),
    )


def job(input_path: Path, output: Path, stages: list[pb.Stage], **fields: Any) -> pb.Job:
    values: dict[str, Any] = {
        "display_name": "test",
        "input_uri": f"file://{input_path}",
        "input_format": pb.DATA_FORMAT_PARQUET
        if input_path.suffix == ".parquet"
        else pb.DATA_FORMAT_JSONL,
        "id_column": "id",
        "keep_columns": ["text"],
        "stages": stages,
        "output_uri": f"file://{output}",
    }
    return pb.Job(**(values | fields))


async def run_to_end(stub, request: rpc.CreateJobRequest) -> pb.Job:
    created = await stub.CreateJob(request)
    name = created.operation.name
    assert created.operation.metadata.state == pb.JOB_STATE_QUEUED
    last = None
    async with asyncio.timeout(JOB_TIMEOUT_S):
        async for update in stub.WatchJob(rpc.WatchJobRequest(name=name)):
            last = update.job
    assert last is not None
    return last


def read_output(output: Path) -> pa.Table:
    parts = sorted(output.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else pa.table({})


def read_errors(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for part in sorted(folder.glob("part-*.jsonl")):
        rows += [json.loads(line) for line in part.read_text().splitlines() if line]
    return rows


@pytest.mark.timeout(300)
async def test_a_job_embeds_every_row_with_the_pinned_version_and_captures_bad_rows(batch):
    texts = sentences(600, seed=3)
    texts[5] = "   "  # empty after normalizing: fails in the callable
    texts[77] = "\t\n"
    table = pa.table({"id": [f"r{i}" for i in range(600)], "text": texts})
    source = batch.data / "basic" / "in.parquet"
    source.parent.mkdir(parents=True)
    pq.write_table(table, source)
    output = batch.data / "basic" / "out"
    final = await run_to_end(
        batch.stub,
        rpc.CreateJobRequest(
            job=job(source, output, [normalize_stage(), embed_stage(batch_size=32)])
        ),
    )
    assert final.state == pb.JOB_STATE_SUCCEEDED_WITH_ERRORS, final
    assert final.progress.rows_total == 600
    assert final.progress.rows_done == 598 and final.progress.rows_failed == 2
    stages = {s.name: s for s in final.progress.stages}
    assert stages["clean"].rows_failed == 2 and stages["embed"].rows_out == 598
    assert stages["embed"].model_version.startswith("minilm@")
    out = read_output(output)
    ids = out.column("id").to_pylist()
    assert sorted(ids) == sorted(f"r{i}" for i in range(600) if i not in (5, 77))
    assert len(set(ids)) == len(ids)
    assert set(out.column("embedding_model").to_pylist()) == {stages["embed"].model_version}
    vectors = np.array(out.column("embedding").to_pylist(), dtype=np.float32)
    assert vectors.shape == (598, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    errors = read_errors(output / "_errors")
    assert {e["id"] for e in errors} == {"r5", "r77"}
    assert all(e["stage"] == "clean" and e["message"] == "empty text" for e in errors)
    assert errors[0]["row"]["text"] in ("   ", "\t\n")
    # Equal to the model run directly on the same (normalized) texts.
    from mlmesh_triton.build import minilm_folder
    from mlmesh_triton.sentence_encoder import SentenceEncoder

    by_id = dict(zip(ids, vectors, strict=True))
    sample = ["r0", "r1", "r300", "r599"]
    direct, _ = SentenceEncoder(str(minilm_folder())).encode(
        [" ".join(texts[int(i[1:])].split()) for i in sample]
    )
    assert np.allclose(np.stack([by_id[i] for i in sample]), direct, atol=1e-4)


@pytest.mark.timeout(300)
async def test_a_classify_pipeline_with_pre_and_postprocessing_from_json_lines(batch):
    """numbers.parse -> digits (CLASSIFY) -> class.label, on JSON lines:
    the labels equal scikit-learn's predictions of the same model."""
    from mlmesh_triton.build import digits_training_data, train_digits

    pixels, _ = digits_training_data()
    rows = [{"id": i, "pixels": " ".join(str(int(v)) for v in pixels[i])} for i in range(150)]
    rows[40]["pixels"] = "1 2 3"  # the wrong length: fails in numbers.parse
    folder = batch.data / "classify"
    folder.mkdir()
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = [f"digit-{d}" for d in range(10)]

    def callable_stage(
        name: str, function: str, source: str, target: str, **params: Any
    ) -> pb.Stage:
        struct = struct_pb2.Struct()
        struct.update(params)
        return pb.Stage(
            name=name,
            callable=pb.CallableStage(
                function=function, input_column=source, output_column=target, parameters=struct
            ),
        )

    stages = [
        callable_stage("parse", "numbers.parse", "pixels", "vector", size=64),
        pb.Stage(
            name="classify",
            model=pb.ModelStage(
                model=ModelReference(model="digits", alias="champion"),
                task=pb.TASK_CLASSIFY,
                input_column="vector",
                output_column="digit",
                concurrency=1,
            ),
        ),
        callable_stage("name", "class.label", "digit", "label", labels=names),
    ]
    spec = job(folder / "in.jsonl", folder / "out", stages, keep_columns=[])
    final = await run_to_end(batch.stub, rpc.CreateJobRequest(job=spec))
    assert final.state == pb.JOB_STATE_SUCCEEDED_WITH_ERRORS, final
    assert (final.progress.rows_done, final.progress.rows_failed) == (149, 1)
    out = read_output(folder / "out")
    assert out.column_names == ["id", "vector", "digit", "digit_score", "digit_model", "label"]
    predicted = train_digits().predict(pixels[:150])
    by_id = dict(zip(out.column("id").to_pylist(), out.column("digit").to_pylist(), strict=True))
    assert all(by_id[i] == predicted[i] for i in by_id)
    assert set(out.column("label").to_pylist()) <= set(names)
    assert read_errors(folder / "out" / "_errors")[0]["stage"] == "parse"

"""The batch service's pieces without Ray: URIs, parts and checkpoints, the
callables, the Triton config parser, long JSON lines, the plan."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pytest
from mlmesh_batch import callables, storage
from mlmesh_batch.models import tensor_specs
from mlmesh_batch.plan import JobPlan, StagePlan
from mlmesh_batch.source import MAX_LINE, _lines


def test_uris_resolve_only_under_the_allowed_roots(tmp_path):
    root = tmp_path / "data"
    (root / "in").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", root / "in" / "link")
    ok = storage.resolve(f"file://{root}/in/a.parquet", [root], [])
    assert ok.local and ok.path == f"{root}/in/a.parquet"
    assert storage.resolve(f"{root}/in", [root], []).path == f"{root}/in"
    for bad in [
        f"file://{root}/../secret",
        f"file://{root}/in/link",  # a link out of the root
        "file://host/etc/passwd",
        "relative/path",
        f"file://{root}/in\n",
        "s3://bucket/key",  # not enabled
        "gopher://x",
    ]:
        with pytest.raises(storage.UriRefused):
            storage.resolve(bad, [root], [])
    assert storage.echo("x" * 500).endswith("...") and len(storage.echo("x" * 500)) < 100


def test_parts_are_whole_and_the_checkpoint_is_their_ids(tmp_path):
    output = storage.resolve(str(tmp_path / "out"), [tmp_path], [])
    errors = output.join("_errors")
    assert storage.is_empty(output)
    storage.write_part(output, 1, pa.table({"id": ["a", "b"]}))
    storage.write_errors(errors, 2, [{"id": "c", "stage": "s"}])
    storage.write_part(output, 3, pa.table({"id": ["d"]}))
    # A temporary file a crash left is not a part.
    (tmp_path / "out" / "_tmp").mkdir(exist_ok=True)
    (tmp_path / "out" / "_tmp" / "part-000004.parquet.abc").write_bytes(b"half")
    ids, last = storage.written_ids(output, errors, "id")
    assert ids == {"a", "b", "c", "d"} and last == 3
    assert not storage.is_empty(output)
    assert sorted(storage.committed(output, "parquet")) == [1, 3]


def test_callables_fail_rows_alone_and_check_their_parameters():
    normalize = callables.make("text.normalize", {"lowercase": True, "max_chars": 5})
    assert normalize("  Hello   World ") == "hello"
    with pytest.raises(callables.RowError):
        normalize("   ")
    with pytest.raises(callables.RowError):
        normalize(42)
    assert callables.check_parameters("vector.round", {}) == {"digits": 4}
    assert callables.check_parameters("numbers.parse", {"size": 64.0}) == {"size": 64}
    with pytest.raises(callables.ParameterError) as unknown:
        callables.check_parameters("text.normalize", {"shout": True})
    assert unknown.value.field == "shout"
    with pytest.raises(callables.ParameterError):
        callables.check_parameters("text.template", {"template": "no slot"})
    with pytest.raises(callables.ParameterError):
        callables.check_parameters("class.label", {})
    with pytest.raises(callables.ParameterError):
        callables.check_parameters("text.normalize", {"lowercase": 1})
    label = callables.make("class.label", {"labels": ["a", "b"]})
    assert label(1) == "b"
    with pytest.raises(callables.RowError):
        label(7)


def test_the_triton_config_parser_reads_inputs_and_outputs():
    config = """backend: "python"
max_batch_size: 64
input [ { name: "text" data_type: TYPE_STRING dims: [ 1 ] } ]
output [
  { name: "embedding" data_type: TYPE_FP32 dims: [ 384 ] },
  { name: "token_count" data_type: TYPE_INT64 dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
    inputs, outputs = tensor_specs(config)
    assert [(t.name, t.data_type) for t in inputs] == [("text", "TYPE_STRING")]
    assert [t.name for t in outputs] == ["embedding", "token_count"]


def test_a_json_line_longer_than_the_limit_is_skipped_whole():
    text = '{"id": 1}\n' + "x" * (MAX_LINE * 2 + 10) + "\n" + '{"id": 2}\n'
    lines = list(_lines(io.StringIO(text)))
    assert lines == ['{"id": 1}\n', None, '{"id": 2}\n']


def test_a_plan_round_trips_and_lists_its_output_columns():
    stages = [
        StagePlan(name="clean", kind="callable", input_column="text", output_column="text"),
        StagePlan(
            name="classify",
            kind="model",
            input_column="text",
            output_column="digit",
            model="digits",
            version=3,
            task="classify",
        ),
    ]
    plan = JobPlan(
        "j1", "file:///x", "parquet", "id", ["text"], stages, "file:///o", "file:///o/_errors"
    )
    assert JobPlan.from_json(plan.to_json()) == plan
    assert plan.output_columns() == ["id", "text", "digit", "digit_score", "digit_model"]
    assert stages[1].model_version == "digits@3"


def test_a_block_of_lines_that_did_not_parse_keeps_the_id_type(tmp_path):
    """Good rows with integer ids and a broken line concatenate (the broken
    line's id is null), and the stages pass over it."""
    import fsspec
    from mlmesh_batch.source import InputSource
    from mlmesh_batch.stages import CallableStage

    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "text": "a"}\n{broken\n{"id": 2, "text": "b"}\n')
    source = InputSource([str(path)], fsspec.filesystem("file"), "jsonl", ["id", "text"], "id", 100)
    blocks = list(source._read(str(path), []))
    table = pa.concat_tables(blocks, promote_options="permissive")
    assert table.column("id").type == pa.int64()
    assert table.column("id").to_pylist() == [1, 2, None]
    stage = StagePlan(
        name="clean",
        kind="callable",
        input_column="text",
        output_column="text",
        function="text.normalize",
        parameters={"lowercase": False, "max_chars": 0},
    )
    out = pa.concat_tables([CallableStage(stage)(b) for b in blocks], promote_options="permissive")
    assert out.column("_error_stage").to_pylist() == [None, None, "read"]
    skipping = InputSource(
        [str(path)],
        fsspec.filesystem("file"),
        "jsonl",
        ["id", "text"],
        "id",
        100,
        frozenset({"in.jsonl:2"}),
    )
    assert sum(b.num_rows for b in skipping._read(str(path), [])) == 2

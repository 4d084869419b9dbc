"""What the `mlmesh` commands print: a short summary by default, the full
record with --json wherever it is typed; `infer` against a gateway double
that records what it was sent."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.common.v1.usage_pb2 import Usage
from mlmesh.gateway.v1 import gateway_pb2 as gpb
from mlmesh.gateway.v1 import gateway_service_pb2 as grpc_pb
from mlmesh.gateway.v1 import gateway_service_pb2_grpc
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh_sdk import cli


def test_every_command_takes_json_and_progress_before_or_after_it() -> None:
    parser = cli.build_parser()
    commands = cli._commands_of(parser)
    assert sorted(c.prog.removeprefix("mlmesh ") for c in commands) == [
        "alias history",
        "alias rollback",
        "alias set",
        "batch callables",
        "batch cancel",
        "batch embed",
        "batch get",
        "batch list",
        "batch resume",
        "batch submit",
        "batch watch",
        "download",
        "embed",
        "features apply",
        "features get",
        "generate",
        "infer",
        "keys create",
        "keys list",
        "keys revoke",
        "keys rotate",
        "models list",
        "resolve",
        "upload",
        "usage",
        "versions list",
    ]
    for command in commands:
        options = command._option_string_actions
        assert {"--json", "--progress", "--no-progress"} <= options.keys(), command.prog
    assert parser.parse_args(["keys", "list", "--json"]).json
    assert parser.parse_args(["--json", "keys", "list"]).json  # not reset by the command
    assert not parser.parse_args(["keys", "list"]).json


def test_a_version_is_one_line_whatever_its_lineage_holds() -> None:
    lock = "\n".join(f"package-{i}==1.{i}" for i in range(300))
    version = pb.ModelVersion(
        model="churn",
        version=3,
        sha256="ab" * 32,
        size_bytes=5 * 1024**2,
        format="sklearn",
        aliases=["champion"],
        tags={"team": "risk"},
        lineage=pb.Lineage(environment_lock=lock),
    )
    assert cli.summary(version) == (
        "churn/3  sha256:abababababab  5.0 MiB  format=sklearn  aliases=champion  "
        "tags=team=risk  lineage: 300 packages"
    )


def _probabilities(rows: list[list[float]]) -> gpb.InferTensor:
    flat = [v for row in rows for v in row]
    return gpb.InferTensor(
        name="probabilities",
        datatype="FP32",
        shape=[len(rows), len(rows[0])],
        raw_contents=struct.pack(f"<{len(flat)}f", *flat),
    )


def test_an_infer_response_is_a_line_per_output_with_the_argmax_of_each_row() -> None:
    response = grpc_pb.InferResponse(
        model=ModelReference(model="digits", version=2),
        outputs=[
            _probabilities([[0.125, 0.75, 0.125], [0.5, 0.25, 0.25], [0, 0, 1]]),
            gpb.InferTensor(name="label", datatype="BYTES", shape=[1]),
        ],
        usage=Usage(input_items=192),
    )
    response.outputs[1].values.bytes_contents.append(b"seven")
    assert cli.summary(response).splitlines() == [
        "digits/2  2 outputs  items=192",
        "  probabilities  FP32 3x3  0.125 0.75 0.125 0.5 0.25 0.25 ... (9 values)",
        "    argmax by row: 1 0 2",
        "  label  BYTES 1  b'seven'",
    ]


class Gateway(gateway_service_pb2_grpc.GatewayServiceServicer):
    """Answers Infer with the softmax of each input row; keeps the requests."""

    def __init__(self) -> None:
        self.requests: list[grpc_pb.InferRequest] = []

    async def Infer(self, request, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        [tensor] = request.inputs
        rows = np.array(tensor.values.fp32_contents or np.frombuffer(tensor.raw_contents, "<f4"))
        rows = rows.reshape(list(tensor.shape)).astype(np.float32)
        soft = np.exp(rows) / np.exp(rows).sum(axis=1, keepdims=True)
        return grpc_pb.InferResponse(
            model=ModelReference(model=request.model.model, version=4),
            id=request.id or "generated",
            outputs=[
                gpb.InferTensor(
                    name="probabilities",
                    datatype="FP32",
                    shape=list(soft.shape),
                    raw_contents=soft.astype("<f4").tobytes(),
                )
            ],
            usage=Usage(input_items=rows.size),
        )


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, Gateway]]:
    server = grpc.aio.server()
    servicer = Gateway()
    gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


async def run_cli(argv: list[str]) -> None:
    """One command in this test's event loop (main() runs its own)."""
    await cli._run(cli.build_parser().parse_args(argv))


async def test_infer_sends_typed_json_inputs_and_prints_a_summary(
    gateway: tuple[str, Gateway], capsys: pytest.CaptureFixture[str]
) -> None:
    target, servicer = gateway
    await run_cli(
        [
            "--target",
            target,
            "infer",
            "digits@champion",
            "--input",
            "pixels=[[0, 5, 1], [3, 0, 0]]",
            "--output",
            "probabilities",
            "--id",
            "req-1",
        ]
    )
    [request] = servicer.requests
    assert (request.model.model, request.model.alias, request.id) == ("digits", "champion", "req-1")
    assert list(request.output_names) == ["probabilities"]
    [pixels] = request.inputs
    assert (pixels.datatype, list(pixels.shape)) == ("FP32", [2, 3])
    assert list(pixels.values.fp32_contents) == [0, 5, 1, 3, 0, 0]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "digits/4  1 output  items=6"
    assert out[1] == "  probabilities  FP32 2x3  0.006573 0.9756 0.01787 0.9094 0.04528 0.04528"
    assert out[2] == "    argmax by row: 1 0"


async def test_infer_json_has_the_outputs_as_numbers(
    gateway: tuple[str, Gateway], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target, servicer = gateway
    np.save(tmp_path / "x.npy", np.array([[1.0, 2.0], [2.0, 1.0]], dtype=np.float32))
    await run_cli(
        ["--target", target, "infer", "digits", "--input", f"x=@{tmp_path / 'x.npy'}", "--json"]
    )
    assert servicer.requests[0].inputs[0].WhichOneof("contents") == "raw_contents"
    [line] = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    [output] = record["outputs"]
    assert "rawContents" not in output
    values = output["values"]["fp32Contents"]
    assert [round(v, 4) for v in values] == [0.2689, 0.7311, 0.7311, 0.2689]
    assert record["id"] == "generated" and record["usage"]["inputItems"] == "4"


def test_a_bad_input_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for text, message in [
        ("x:INT8=[300]", "300 is out of INT8's range"),
        (f"x=@{tmp_path / 'nope.npy'}", "No such file or directory"),
    ]:
        with pytest.raises(SystemExit) as exited:
            cli.main(["--target", "127.0.0.1:1", "infer", "digits", "--input", text])
        assert exited.value.code == 2
        assert message in capsys.readouterr().err

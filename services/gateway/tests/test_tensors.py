"""The Infer contract's tensors and parameters, to and from what Triton takes."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import struct_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.errors import InvalidArgument
from mlmesh_gateway.tensors import from_numpy, sent_typed, to_numpy, triton_parameters


def test_typed_values_in_typed_values_out():
    sent = pb.InferTensor(
        name="x",
        datatype="FP32",
        shape=[2, 2],
        values=pb.TensorContents(fp32_contents=[1, 2, 3, 4]),
    )
    array = to_numpy(sent, "inputs[0]")
    assert array.dtype == np.float32 and array.shape == (2, 2)
    assert sent_typed([sent])
    back = from_numpy("y", array * 2, typed=True)
    assert back.WhichOneof("contents") == "values"
    assert list(back.values.fp32_contents) == [2, 4, 6, 8] and list(back.shape) == [2, 2]


def test_raw_in_raw_out_and_fp16_only_raw():
    array = np.arange(6, dtype=np.float16).reshape(2, 3)
    sent = pb.InferTensor(name="x", datatype="FP16", shape=[2, 3], raw_contents=array.tobytes())
    assert not sent_typed([sent])
    np.testing.assert_array_equal(to_numpy(sent, "inputs[0]"), array)
    back = from_numpy("y", array, typed=True)  # FP16 has no typed field: raw
    assert back.WhichOneof("contents") == "raw_contents" and back.raw_contents == array.tobytes()
    typed_fp16 = pb.InferTensor(name="x", datatype="FP16", shape=[1], values=pb.TensorContents())
    with pytest.raises(InvalidArgument):
        to_numpy(typed_fp16, "inputs[0]")


def test_raw_bytes_are_length_prefixed_both_ways():
    array = np.array([b"ab", b"", "ü".encode()], dtype=object)
    raw = from_numpy("t", array).raw_contents
    assert raw == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xbc"
    sent = pb.InferTensor(name="t", datatype="BYTES", shape=[3], raw_contents=raw)
    assert list(to_numpy(sent, "inputs[0]")) == [b"ab", b"", "ü".encode()]
    cut = pb.InferTensor(name="t", datatype="BYTES", shape=[1], raw_contents=b"\x09\x00\x00\x00ab")
    with pytest.raises(InvalidArgument) as error:
        to_numpy(cut, "inputs[0]")
    assert error.value.violations[0].field == "inputs[0].raw_contents"


def test_shape_and_size_must_agree():
    sent = pb.InferTensor(name="x", datatype="INT32", shape=[3], raw_contents=b"\x00" * 7)
    with pytest.raises(InvalidArgument):
        to_numpy(sent, "inputs[0]")
    sent = pb.InferTensor(name="x", datatype="INT32", shape=[3], raw_contents=b"\x00" * 8)
    with pytest.raises(InvalidArgument) as error:
        to_numpy(sent, "inputs[0]")
    assert error.value.violations[0].field == "inputs[0].shape"


def test_parameters_become_triton_request_parameters():
    parameters = struct_pb2.Struct()
    parameters.update({"mode": "fast", "beam": 4, "scale": 0.5, "strict": True})
    assert triton_parameters(parameters) == {
        "mode": "fast",
        "beam": 4,
        "scale": 0.5,
        "strict": True,
    }
    assert triton_parameters(struct_pb2.Struct()) == {}


def test_reserved_and_nested_parameters_are_refused_each_named():
    parameters = struct_pb2.Struct()
    parameters.update({"priority": 1, "nested": {"a": 1}, "list": [1], "ok": "x"})
    with pytest.raises(InvalidArgument) as error:
        triton_parameters(parameters)
    fields = sorted(v.field for v in error.value.violations)
    assert fields == ["parameters['list']", "parameters['nested']", "parameters['priority']"]

"""Infer tensors from what a person types (JSON, .json and .npy files), and
their elements back from either contents form."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_sdk import tensors
from mlmesh_sdk.tensors import elements, from_values, parse_input, with_values


def test_json_numbers_are_fp32_typed_contents_of_their_shape() -> None:
    tensor = parse_input("pixels=[[0, 1.5, 3], [4, 5, 6.25]]")
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("pixels", "FP32", [2, 3])
    assert tensor.WhichOneof("contents") == "values"
    assert list(tensor.values.fp32_contents) == [0, 1.5, 3, 4, 5, 6.25]
    assert elements(tensor) == [0, 1.5, 3, 4, 5, 6.25]


def test_a_scalar_bools_and_strings() -> None:
    scalar = parse_input("temperature=0.5")
    assert (list(scalar.shape), elements(scalar)) == ([], [0.5])
    flags = parse_input("mask=[true, false]")
    assert (flags.datatype, list(flags.values.bool_contents)) == ("BOOL", [True, False])
    texts = parse_input('text=["héllo", "b"]')
    assert (texts.datatype, list(texts.values.bytes_contents)) == (
        "BYTES",
        ["héllo".encode(), b"b"],
    )


def test_a_datatype_after_the_name_decides_and_is_checked() -> None:
    ids = parse_input("ids:INT64=[[101, 2023, 102]]")
    assert (ids.datatype, list(ids.values.int64_contents)) == ("INT64", [101, 2023, 102])
    assert parse_input("x:uint8=[0, 255]").datatype == "UINT8"
    # a colon that is not a datatype is part of the name (TensorFlow names)
    assert parse_input("input:0=[1]").name == "input:0"
    for text, message in [
        ("ids:INT64=[1.5]", "1.5 is not an integer"),
        ("x:UINT8=[256]", "256 is out of UINT8's range"),
        ("x:INT8=[-129]", "-129 is out of INT8's range"),
        ("x:FP32=[true]", "True is not a number"),
        ("x:BYTES=[1]", "1 is not a string"),
        ("x=[[1, 2], [3]]", "rows of different lengths"),
        ("x=" + "[" * 17 + "]" * 17, "more than 16 dimensions"),
        ("x=[1, 2", "not JSON: '[1, 2'"),
        ("pixels", "expected NAME=VALUE"),
        ("=[1]", "input name ''"),
        ("a b=[1]", "input name 'a b'"),
        ("x" * 129 + "=[1]", "1 to 128 characters"),
    ]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            parse_input(text)


def test_half_precision_travels_as_raw_bytes() -> None:
    half = parse_input("x:FP16=[1.5, -2]")
    assert half.raw_contents == struct.pack("<2e", 1.5, -2)
    assert elements(half) == [1.5, -2]
    brain = parse_input("x:BF16=[1.0, 3.140625, 1.00390625]")
    # 1.00390625 is halfway between two BF16 values: rounded to the even one
    assert elements(brain) == [1.0, 3.140625, 1.0]
    assert math.isnan(elements(from_values("x", [math.nan], "BF16"))[0])
    assert with_values(half) is half  # no typed field for FP16: stays raw


def test_files_json_and_npy(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps([[1, 2], [3, 4]]))
    assert elements(parse_input(f"x=@{tmp_path / 'x.json'}")) == [1, 2, 3, 4]
    array = np.arange(6, dtype=np.float64).reshape(2, 3)
    np.save(tmp_path / "x.npy", array)
    tensor = parse_input(f"x=@{tmp_path / 'x.npy'}")
    assert (tensor.datatype, list(tensor.shape)) == ("FP64", [2, 3])
    assert tensor.raw_contents == array.tobytes()
    cast = parse_input(f"x:FP32=@{tmp_path / 'x.npy'}")
    assert cast.raw_contents == array.astype("<f4").tobytes()
    np.save(tmp_path / "big.npy", array.astype(">i4"))  # big-endian on disk: sent little
    assert elements(parse_input(f"x=@{tmp_path / 'big.npy'}")) == [0, 1, 2, 3, 4, 5]
    np.save(tmp_path / "s.npy", np.array(["a", "bc"]))
    assert elements(parse_input(f"x=@{tmp_path / 's.npy'}")) == [b"a", b"bc"]
    np.save(tmp_path / "c.npy", np.array([1j]))
    with pytest.raises(ValueError, match="holds complex128, not a tensor type"):
        parse_input(f"x=@{tmp_path / 'c.npy'}")
    np.save(tmp_path / "o.npy", np.array([{}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):  # pickles are never loaded
        parse_input(f"x=@{tmp_path / 'o.npy'}")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"neither \.json nor \.npy"):
        parse_input(f"x=@{tmp_path / 'x.csv'}")
    with pytest.raises(FileNotFoundError):
        parse_input(f"x=@{tmp_path / 'missing.npy'}")


def test_a_file_over_the_limit_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tensors, "MAX_INPUT_BYTES", 10)
    (tmp_path / "x.json").write_text("[1, 2, 3, 4, 5]")
    with pytest.raises(ValueError, match="larger than 10 bytes"):
        parse_input(f"x=@{tmp_path / 'x.json'}")
    with pytest.raises(ValueError, match="more than 10 bytes"):
        parse_input("x=[1, 2, 3, 4, 5]")


def test_raw_outputs_decode_and_become_typed_values() -> None:
    raw = pb.InferTensor(
        name="p", datatype="FP32", shape=[2, 2], raw_contents=struct.pack("<4f", 0.25, 0.75, 1, 0)
    )
    assert elements(raw) == [0.25, 0.75, 1, 0]
    typed = with_values(raw)
    assert typed.WhichOneof("contents") == "values"
    assert list(typed.values.fp32_contents) == [0.25, 0.75, 1, 0]
    assert list(typed.shape) == [2, 2]
    words = pb.InferTensor(
        name="w", datatype="BYTES", shape=[2], raw_contents=b"\x01\0\0\0a\x02\0\0\0bc"
    )
    assert elements(words) == [b"a", b"bc"]
    for broken in (
        pb.InferTensor(name="p", datatype="FP32", raw_contents=b"\0\0\0"),
        pb.InferTensor(name="w", datatype="BYTES", raw_contents=b"\x05\0\0\0ab"),
        pb.InferTensor(name="w", datatype="BYTES", raw_contents=b"\x01\0\0\0a\0"),
    ):
        with pytest.raises(ValueError):
            elements(broken)

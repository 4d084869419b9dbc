"""Infer tensors (mlmesh.gateway.v1.InferTensor) from what a person types,
and their elements back as Python values.

    parse_input("pixels=[[0, 1.5, 3]]")     # JSON: numbers are FP32
    parse_input("ids:INT64=[[101, 2023]]")  # a datatype after the name
    parse_input("pixels=@batch.npy")        # a .npy file (its dtype) or a .json file

JSON values are a number, bool or string, or rectangular nested lists of
them; they travel as typed contents (FP16 and BF16 as raw bytes, the only
form the contract has for them). A .npy file travels as raw little-endian
bytes; reading one needs numpy. ``elements`` decodes either form.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from mlmesh.gateway.v1 import gateway_pb2 as pb

# The gateway takes at most 64 MiB of inputs in all; a file or value larger
# than that is refused before it is read.
MAX_INPUT_BYTES = 64 * 1024 * 1024
MAX_NAME_CHARS = 128
MAX_RANK = 16

# datatype -> (struct format of one element, TensorContents field)
FORMATS: dict[str, tuple[str, str]] = {
    "BOOL": ("?", "bool_contents"),
    "UINT8": ("B", "uint_contents"),
    "UINT16": ("H", "uint_contents"),
    "UINT32": ("I", "uint_contents"),
    "UINT64": ("Q", "uint64_contents"),
    "INT8": ("b", "int_contents"),
    "INT16": ("h", "int_contents"),
    "INT32": ("i", "int_contents"),
    "INT64": ("q", "int64_contents"),
    "FP16": ("e", ""),
    "BF16": ("H", ""),  # the upper half of an FP32
    "FP32": ("f", "fp32_contents"),
    "FP64": ("d", "fp64_contents"),
    "BYTES": ("", "bytes_contents"),
}
DATATYPES = tuple(FORMATS)
_NAME = re.compile(rf"[^\s=]{{1,{MAX_NAME_CHARS}}}")


def _prefix(text: str) -> str:
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def parse_input(text: str) -> pb.InferTensor:
    """``NAME[:DATATYPE]=JSON`` or ``NAME[:DATATYPE]=@FILE`` as a tensor;
    ValueError says what is wrong."""
    name, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"expected NAME=VALUE or NAME=@FILE, got {_prefix(text)}")
    datatype: str | None = None
    base, colon, suffix = name.rpartition(":")
    if colon and suffix.upper() in FORMATS:
        name, datatype = base, suffix.upper()
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"input name {_prefix(name)}: 1 to {MAX_NAME_CHARS} characters, no spaces or '='"
        )
    if value.startswith("@"):
        return _from_file(name, Path(value[1:]), datatype)
    if len(value) > MAX_INPUT_BYTES:
        raise ValueError(f"input {name!r}: more than {MAX_INPUT_BYTES} bytes")
    try:
        parsed = json.loads(value)
    except ValueError:
        raise ValueError(f"input {name!r}: not JSON: {_prefix(value)}") from None
    return from_values(name, parsed, datatype)


def _from_file(name: str, path: Path, datatype: str | None) -> pb.InferTensor:
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise ValueError(f"input {name!r}: {path} is larger than {MAX_INPUT_BYTES} bytes")
    if path.suffix == ".npy":
        return _from_npy(name, path, datatype)
    if path.suffix == ".json":
        try:
            parsed = json.loads(path.read_text())
        except ValueError as error:
            raise ValueError(f"input {name!r}: {path} is not JSON: {error}") from None
        return from_values(name, parsed, datatype)
    raise ValueError(f"input {name!r}: {path} is neither .json nor .npy")


def _shape(value: Any, depth: int = 0) -> list[int]:
    if not isinstance(value, list):
        return []
    if depth >= MAX_RANK:
        raise ValueError(f"more than {MAX_RANK} dimensions")
    inner = [_shape(item, depth + 1) for item in value]
    if any(shape != inner[0] for shape in inner):
        raise ValueError("rows of different lengths (a tensor is rectangular)")
    return [len(value), *(inner[0] if inner else [])]


def _flat(value: Any) -> list[Any]:
    if not isinstance(value, list):
        return [value]
    return [element for item in value for element in _flat(item)]


def _guess(elements: list[Any]) -> str:
    if elements and all(isinstance(e, bool) for e in elements):
        return "BOOL"
    if elements and all(isinstance(e, str) for e in elements):
        return "BYTES"
    return "FP32"


def _check(datatype: str, element: Any) -> Any:
    """The element as its datatype's contents hold it, or ValueError."""
    if datatype == "BOOL":
        if not isinstance(element, bool):
            raise ValueError(f"{element!r} is not true or false")
        return element
    if datatype == "BYTES":
        if not isinstance(element, str):
            raise ValueError(f"{element!r} is not a string")
        return element.encode()
    if isinstance(element, bool) or not isinstance(element, int | float):
        raise ValueError(f"{element!r} is not a number")
    if datatype.startswith(("INT", "UINT")):
        if not isinstance(element, int):
            raise ValueError(f"{element!r} is not an integer")
        bits = int(datatype.removeprefix("U").removeprefix("INT"))
        low, high = (
            (0, 2**bits - 1) if datatype[0] == "U" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        )
        if not low <= element <= high:
            raise ValueError(f"{element} is out of {datatype}'s range")
    return element


def _bf16(value: float) -> int:
    """The BF16 bits of a float, rounded to nearest even (NaN stays NaN)."""
    if math.isnan(value):
        return 0x7FC0
    bits: int = struct.unpack("<I", struct.pack("<f", value))[0]
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def from_values(name: str, value: Any, datatype: str | None = None) -> pb.InferTensor:
    """A tensor of a JSON-like value (nested lists); its datatype guessed
    from the elements when not given (numbers: FP32)."""
    try:
        shape = _shape(value)
        elements = _flat(value)
        datatype = datatype or _guess(elements)
        checked = [_check(datatype, e) for e in elements]
    except ValueError as error:
        raise ValueError(f"input {name!r}: {error}") from None
    tensor = pb.InferTensor(name=name, datatype=datatype, shape=shape)
    fmt, field = FORMATS[datatype]
    if not checked:
        return tensor
    try:
        if datatype == "BF16":
            tensor.raw_contents = struct.pack(f"<{len(checked)}H", *map(_bf16, checked))
        elif not field:
            tensor.raw_contents = struct.pack(f"<{len(checked)}{fmt}", *checked)
        else:
            getattr(tensor.values, field).extend(checked)
    except (OverflowError, struct.error) as error:
        raise ValueError(f"input {name!r}: {error}") from None
    return tensor


def _from_npy(name: str, path: Path, datatype: str | None) -> pb.InferTensor:
    try:
        import numpy as np
    except ImportError:
        raise ValueError("reading a .npy file needs numpy (pip install numpy)") from None
    array = np.load(path, allow_pickle=False)
    if array.dtype.kind in "US":
        return from_values(name, array.astype(str).tolist(), datatype or "BYTES")
    numpy_types = {
        "BOOL": "?",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
        **{f"INT{b}": f"<i{b // 8}" for b in (8, 16, 32, 64)},
        **{f"UINT{b}": f"<u{b // 8}" for b in (8, 16, 32, 64)},
    }
    if datatype is None:
        found = [
            t for t, code in numpy_types.items() if np.dtype(code) == array.dtype.newbyteorder("<")
        ]
        if not found:
            raise ValueError(f"input {name!r}: {path} holds {array.dtype}, not a tensor type")
        datatype = found[0]
    if datatype in ("BF16", "BYTES"):
        return from_values(name, array.tolist(), datatype)
    raw = np.ascontiguousarray(array.astype(numpy_types[datatype])).tobytes()
    return pb.InferTensor(name=name, datatype=datatype, shape=list(array.shape), raw_contents=raw)


def elements(tensor: pb.InferTensor) -> list[Any]:
    """The tensor's elements, row-major, from either contents form (BYTES as
    bytes, BF16 and FP16 as floats)."""
    fmt, field = FORMATS.get(tensor.datatype, ("", ""))
    if tensor.WhichOneof("contents") != "raw_contents":
        return list(getattr(tensor.values, field)) if field else []
    raw = tensor.raw_contents
    if tensor.datatype == "BYTES":
        return _bytes_elements(raw)
    if not fmt or len(raw) % struct.calcsize(fmt):
        raise ValueError(
            f"output {tensor.name!r}: {len(raw)} raw bytes are not {tensor.datatype} elements"
        )
    values = [v for (v,) in struct.iter_unpack(f"<{fmt}", raw)]
    if tensor.datatype == "BF16":
        return [struct.unpack("<f", struct.pack("<I", v << 16))[0] for v in values]
    return values


def _bytes_elements(raw: bytes) -> list[bytes]:
    """KServe's BYTES layout: each element a 4-byte little-endian length, then its bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            break
        (length,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4 : at + 4 + length])
        at += 4 + length
    if at != len(raw):
        raise ValueError("BYTES raw contents end inside an element")
    return out


def with_values(tensor: pb.InferTensor) -> pb.InferTensor:
    """The tensor with typed contents instead of raw bytes (for JSON a
    person reads); FP16 and BF16, which have no typed field, stay raw."""
    field = FORMATS.get(tensor.datatype, ("", ""))[1]
    if tensor.WhichOneof("contents") != "raw_contents" or not field:
        return tensor
    typed = pb.InferTensor(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    getattr(typed.values, field).extend(elements(tensor))
    return typed

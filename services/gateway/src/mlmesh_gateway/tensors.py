"""The gateway's Infer contract to and from what Triton takes: InferTensor
to and from numpy arrays (typed contents or raw little-endian bytes, in and
out), and the request's ``parameters`` as Triton request parameters."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping

import numpy as np
from google.protobuf import struct_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh_chassis.errors import FieldViolation, InvalidArgument
from tritonclient.grpc._utils import (
    TRITON_RESERVED_REQUEST_PARAMS,
    TRITON_RESERVED_REQUEST_PARAMS_PREFIX,
)
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

# The TensorContents field each datatype's typed values go in; FP16 and BF16
# have none (raw_contents only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
MAX_PARAMETERS = 64
MAX_PARAMETER_KEY = 128
MAX_PARAMETER_STRING = 4096
Parameter = str | bool | int | float


def to_numpy(tensor: pb.InferTensor, field: str) -> np.ndarray:
    try:
        dtype = np.dtype(triton_to_np_dtype(tensor.datatype))
    except TypeError as error:
        raise InvalidArgument.field(
            f"{field}.datatype", f"unknown type {tensor.datatype[:32]}"
        ) from error
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument.field(f"{field}.shape", "dimensions are not negative")
    if tensor.WhichOneof("contents") == "raw_contents":
        if tensor.datatype == "BYTES":
            array = _unpack_bytes(tensor.raw_contents, f"{field}.raw_contents")
        elif len(tensor.raw_contents) % dtype.itemsize:
            raise InvalidArgument.field(
                f"{field}.raw_contents", f"not a whole number of {tensor.datatype} elements"
            )
        else:
            array = np.frombuffer(tensor.raw_contents, dtype=dtype.newbyteorder("<"))
    elif tensor.datatype not in _CONTENTS:
        raise InvalidArgument.field(f"{field}.values", f"send {tensor.datatype} as raw_contents")
    else:
        values = list(getattr(tensor.values, _CONTENTS[tensor.datatype]))
        array = np.array(values, dtype=object if tensor.datatype == "BYTES" else dtype)
    if int(np.prod(shape)) != array.size:
        raise InvalidArgument.field(
            f"{field}.shape", f"{list(shape)} does not hold {array.size} values"
        )
    return array.reshape(shape)


def sent_typed(tensors: list[pb.InferTensor]) -> bool:
    """Whether the request sent typed values (outputs go back the same way)."""
    return bool(tensors) and all(t.WhichOneof("contents") == "values" for t in tensors)


def from_numpy(name: str, array: np.ndarray, typed: bool = False) -> pb.InferTensor:
    """``array`` as typed values when ``typed`` (and its datatype has a
    typed field), else as raw little-endian bytes."""
    datatype = np_to_triton_dtype(array.dtype)
    tensor = pb.InferTensor(name=name, datatype=datatype, shape=list(array.shape))
    if typed and datatype in _CONTENTS:
        flat = array.reshape(-1).tolist()
        getattr(tensor.values, _CONTENTS[datatype]).extend(flat)
    elif datatype == "BYTES":
        tensor.raw_contents = _pack_bytes(array)
    else:
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        tensor.raw_contents = little.tobytes()
    return tensor


def _pack_bytes(array: np.ndarray) -> bytes:
    """BYTES elements as the contract's raw form: each a 4-byte little-endian
    length, then its bytes."""
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def _unpack_bytes(raw: bytes, field: str) -> np.ndarray:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument.field(field, f"a length cut short at byte {offset}")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidArgument.field(field, f"an element runs past the end at byte {offset}")
        items.append(raw[offset : offset + size])
        offset += size
    return np.array(items, dtype=object)


def triton_parameters(parameters: struct_pb2.Struct) -> dict[str, Parameter]:
    """The request's ``parameters`` as Triton request parameters: strings,
    booleans and numbers (whole numbers as integers); Triton's reserved
    names and nested values are refused (one BadRequest naming each)."""
    violations: list[FieldViolation] = []
    if len(parameters.fields) > MAX_PARAMETERS:
        raise InvalidArgument.field("parameters", f"at most {MAX_PARAMETERS} parameters")
    converted: dict[str, Parameter] = {}
    for key, value in sorted(parameters.fields.items()):
        field = f"parameters[{key[:32]!r}]"
        kind = value.WhichOneof("kind")
        if not 1 <= len(key) <= MAX_PARAMETER_KEY:
            violations.append(FieldViolation(field, f"names are 1 to {MAX_PARAMETER_KEY} long"))
        elif key in TRITON_RESERVED_REQUEST_PARAMS or key.startswith(
            TRITON_RESERVED_REQUEST_PARAMS_PREFIX
        ):
            violations.append(FieldViolation(field, "is reserved by Triton"))
        elif kind == "string_value" and len(value.string_value) <= MAX_PARAMETER_STRING:
            converted[key] = value.string_value
        elif kind == "bool_value":
            converted[key] = value.bool_value
        elif kind == "number_value" and np.isfinite(value.number_value):
            number = value.number_value
            converted[key] = int(number) if number.is_integer() and abs(number) < 2**63 else number
        else:
            violations.append(
                FieldViolation(
                    field, f"a string (at most {MAX_PARAMETER_STRING}), a bool or a finite number"
                )
            )
    if violations:
        raise InvalidArgument(f"{len(violations)} invalid parameters", violations)
    return converted


# Tensors larger than this are converted off the event loop (converting
# 64 MiB would hold every other call up).
LARGE_BYTES = 1 << 20


async def inputs_of(request: rpc.InferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors by name."""

    def convert() -> dict[str, np.ndarray]:
        return {t.name: to_numpy(t, f"inputs[{i}]") for i, t in enumerate(request.inputs)}

    return await asyncio.to_thread(convert) if request.ByteSize() > LARGE_BYTES else convert()


async def outputs_of(outputs: Mapping[str, np.ndarray], typed: bool) -> list[pb.InferTensor]:
    def convert() -> list[pb.InferTensor]:
        return [from_numpy(name, array, typed) for name, array in outputs.items()]

    large = sum(array.nbytes for array in outputs.values()) > LARGE_BYTES
    return await asyncio.to_thread(convert) if large else convert()

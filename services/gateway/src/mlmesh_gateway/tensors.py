"""InferTensor (the gateway's contract) to and from numpy arrays: typed
contents or raw little-endian bytes in, raw bytes out."""

from __future__ import annotations

import numpy as np
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.errors import InvalidArgument
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

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


def to_numpy(tensor: pb.InferTensor, field: str) -> np.ndarray:
    try:
        dtype = np.dtype(triton_to_np_dtype(tensor.datatype))
    except TypeError as error:
        raise InvalidArgument.field(
            f"{field}.datatype", f"unknown type {tensor.datatype}"
        ) from error
    shape = tuple(int(d) for d in tensor.shape)
    if tensor.WhichOneof("contents") == "raw_contents":
        if tensor.datatype == "BYTES":
            raise InvalidArgument.field(f"{field}.raw_contents", "send BYTES as bytes_contents")
        array = np.frombuffer(tensor.raw_contents, dtype=dtype)
    else:
        values = list(getattr(tensor.values, _CONTENTS.get(tensor.datatype, "fp32_contents")))
        array = np.array(values, dtype=object if tensor.datatype == "BYTES" else dtype)
    if int(np.prod(shape)) != array.size:
        raise InvalidArgument.field(
            f"{field}.shape", f"{list(shape)} does not hold {array.size} values"
        )
    return array.reshape(shape)


def from_numpy(name: str, array: np.ndarray) -> pb.InferTensor:
    return pb.InferTensor(
        name=name,
        datatype=np_to_triton_dtype(array.dtype),
        shape=list(array.shape),
        raw_contents=np.ascontiguousarray(array).tobytes(),
    )

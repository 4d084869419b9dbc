"""Small helpers for driving the registry contract in tests."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable

from mlmesh.common.v1 import model_reference_pb2
from mlmesh.registry.v1 import model_pb2
from mlmesh.registry.v1 import registry_service_pb2 as rpc


def header(model: str, data: bytes, **overrides: object) -> rpc.UploadModelVersionRequest:
    fields = {
        "model": model,
        "create_model": True,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "format": "test",
        "lineage": model_pb2.Lineage(environment_lock="x==1"),
    }
    fields.update(overrides)
    return rpc.UploadModelVersionRequest(header=rpc.UploadHeader(**fields))


def chunks(data: bytes, size: int = 64 * 1024) -> Iterable[rpc.UploadModelVersionRequest]:
    for start in range(0, len(data), size):
        yield rpc.UploadModelVersionRequest(chunk=data[start : start + size])


async def stream(
    *parts: Iterable[rpc.UploadModelVersionRequest] | rpc.UploadModelVersionRequest,
) -> AsyncIterator[rpc.UploadModelVersionRequest]:
    for part in parts:
        if isinstance(part, rpc.UploadModelVersionRequest):
            yield part
        else:
            for message in part:
                yield message


async def upload(registry, model: str, data: bytes, **overrides: object) -> model_pb2.ModelVersion:
    reply = await registry.UploadModelVersion(
        stream(header(model, data, **overrides), chunks(data))
    )
    return reply.model_version


def ref(
    model: str, *, version: int | None = None, alias: str | None = None
) -> model_reference_pb2.ModelReference:
    if version is not None:
        return model_reference_pb2.ModelReference(model=model, version=version)
    if alias is not None:
        return model_reference_pb2.ModelReference(model=model, alias=alias)
    return model_reference_pb2.ModelReference(model=model)


async def download(registry, reference, offset: int = 0) -> tuple[model_pb2.ModelVersion, bytes]:
    version = None
    body = bytearray()
    async for message in registry.DownloadModelVersion(
        rpc.DownloadModelVersionRequest(reference=reference, offset=offset)
    ):
        if message.WhichOneof("content") == "model_version":
            version = message.model_version
        else:
            body.extend(message.chunk)
    assert version is not None
    return version, bytes(body)

"""A download: the version a reference names, then its bytes from an offset."""

from __future__ import annotations

from collections.abc import AsyncIterator

from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh_chassis.errors import InvalidArgument

from mlmesh_registry.artifacts import ArtifactStore
from mlmesh_registry.store import VersionStore


async def open_download(
    versions: VersionStore,
    artifacts: ArtifactStore,
    reference: ModelReference,
    offset: int,
    chunk_bytes: int,
) -> tuple[pb.ModelVersion, AsyncIterator[bytes]]:
    """The version, and its artifact's bytes from ``offset`` on (a resumed
    download starts where the cut-off one ended)."""
    version = await versions.resolve(reference)
    if not 0 <= offset <= version.size_bytes:
        raise InvalidArgument.field(
            "offset", f"must be between 0 and the size {version.size_bytes}"
        )
    path = await versions.artifact_path(version.model, version.version)
    return version, artifacts.read(path, offset, chunk_bytes)

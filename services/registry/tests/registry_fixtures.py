"""What the registry's unit tests share with their conftest (a module of its
own: several test folders have a conftest, so `from conftest import` is
ambiguous)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh.registry.v1.registry_service_pb2_grpc import RegistryServiceStub
from mlmesh_registry.store import RegistryStore

# Short, so a stalled-upload test does not wait a minute.
IDLE_TIMEOUT_S = 1.5


@dataclass
class Registry:
    stub: RegistryServiceStub
    artifacts: Path

    def leftovers(self) -> list[str]:
        """Every file and folder under the artifact root (relative paths)."""
        return sorted(p.relative_to(self.artifacts).as_posix() for p in self.artifacts.rglob("*"))


def upload_header(model: str, data: bytes, /, **fields: Any) -> rpc.UploadHeader:
    """The header of an upload of ``data`` (creating the model unless told)."""
    values: dict[str, Any] = {
        "model": model,
        "create_model": True,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
    }
    return rpc.UploadHeader(**{**values, **fields})


async def add_version(
    store: RegistryStore, model: str, data: bytes = b"weights", **fields: Any
) -> pb.ModelVersion:
    """Records a version straight in the store (its artifact path is a name
    only: store tests read no bytes)."""
    header = upload_header(model, data, **fields)
    return await store.versions.add(header, f"artifacts/{model}/{header.sha256}.bin")

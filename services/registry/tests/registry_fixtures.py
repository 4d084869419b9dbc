"""What the registry's unit tests share with their conftest (a module of its
own: several test folders have a conftest, so `from conftest import` is
ambiguous)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlmesh.registry.v1.registry_service_pb2_grpc import RegistryServiceStub

# Short, so a stalled-upload test does not wait a minute.
IDLE_TIMEOUT_S = 1.5


@dataclass
class Registry:
    stub: RegistryServiceStub
    artifacts: Path

    def leftovers(self) -> list[str]:
        """Every file and folder under the artifact root (relative paths)."""
        return sorted(p.relative_to(self.artifacts).as_posix() for p in self.artifacts.rglob("*"))

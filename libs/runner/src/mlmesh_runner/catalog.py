"""The services the local runner starts, in order: one entry per service.

A later service joins the mesh by adding one ``ServiceSpec`` here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import descriptor


@dataclass(frozen=True)
class RunContext:
    """What a spec may use: the state directory and the services started so far."""

    state: Path
    ports: dict[str, int]

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one mesh service locally."""

    name: str
    # argv; the runner sets <env_prefix>PORT=0 and <env_prefix>PORT_FILE.
    command: Sequence[str]
    # The gRPC services it serves (routes and health checks come from these).
    services: Callable[[], Sequence[descriptor.ServiceDescriptor]]
    # Environment prefix of its settings, e.g. MLMESH_REGISTRY_.
    env_prefix: str
    # Default environment (the caller's environment overrides it).
    env: Callable[[RunContext], dict[str, str]] = field(default=lambda ctx: {})
    # A command to run to completion before the service starts (e.g. to build
    # and register a model), or None.
    prepare: Callable[[RunContext], Sequence[str]] | None = None
    # Seconds to wait for health SERVING at start.
    start_timeout: float = 60.0


def _registry_services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.registry.v1 import registry_service_pb2

    return [registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]]


def _llm_services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.llm.v1 import llm_service_pb2

    return [llm_service_pb2.DESCRIPTOR.services_by_name["LlmService"]]


CATALOG: list[ServiceSpec] = [
    ServiceSpec(
        name="registry",
        command=[sys.executable, "-m", "mlmesh_registry"],
        services=_registry_services,
        env_prefix="MLMESH_REGISTRY_",
        env=lambda ctx: {
            "MLMESH_REGISTRY_DATABASE_URL": f"sqlite+aiosqlite:///{ctx.state}/registry.db",
            "MLMESH_REGISTRY_ARTIFACT_URL": str(ctx.state / "artifacts"),
        },
    ),
    ServiceSpec(
        name="llm",
        command=[sys.executable, "-m", "mlmesh_llm"],
        services=_llm_services,
        env_prefix="MLMESH_LLM_",
        env=lambda ctx: {
            "MLMESH_LLM_REGISTRY_TARGET": ctx.address("registry"),
            "MLMESH_LLM_CACHE_DIR": str(ctx.state / "llm-cache"),
        },
        # Builds the small local model once and registers it as tiny-llama@champion.
        prepare=lambda ctx: [
            sys.executable,
            "-m",
            "mlmesh_llm.tiny_model",
            "--out",
            str(ctx.state / "build" / "tiny-llama"),
            "--register",
            ctx.address("registry"),
        ],
        start_timeout=180.0,
    ),
]

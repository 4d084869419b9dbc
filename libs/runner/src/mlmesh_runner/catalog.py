"""The services the local runner starts, in order: one entry per service.

A later service joins the mesh by adding one ``ServiceSpec`` here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from google.protobuf import descriptor

DEFAULT_REGION = "local"


@dataclass(frozen=True)
class RunContext:
    """What a spec may use: the state directory, the instances started so far
    (``llm``, ``llm.1``, ...) and the region each instance is placed in."""

    state: Path
    ports: dict[str, int]
    regions: dict[str, str] = field(default_factory=dict)

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def region(self, instance: str) -> str:
        return self.regions.get(instance, DEFAULT_REGION)

    def instances(self, service: str) -> list[str]:
        """The started instances of a service: its name, then name.1, name.2, ..."""
        return [name for name in self.ports if name == service or name.startswith(f"{service}.")]


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one mesh service locally."""

    name: str
    # argv, given the context and the port to bind (0 on first start; the
    # same port on a restart). Chassis services also get <env_prefix>PORT and
    # <env_prefix>PORT_FILE in their environment.
    command: Callable[[RunContext, int], Sequence[str]]
    # The gRPC services it serves (routes and health checks come from these).
    services: Callable[[], Sequence[descriptor.ServiceDescriptor]]
    # Environment prefix of its settings, e.g. MLMESH_REGISTRY_.
    env_prefix: str
    # Default environment (the caller's environment overrides it).
    env: Callable[[RunContext], dict[str, str]] = field(default=lambda ctx: {})
    # Environment that overrides the caller's.
    fixed_env: dict[str, str] = field(default_factory=dict)
    # A command to run to completion before the service starts (e.g. to build
    # and register a model), or None.
    prepare: Callable[[RunContext], Sequence[str]] | None = None
    # Seconds to wait for health SERVING at start.
    start_timeout: float = 60.0
    # How its port is learnt: the chassis' port file, or (for other programs)
    # the socket the process listens on.
    port_discovery: Literal["port-file", "listening-socket"] = "port-file"
    # Readiness check given the port, for programs without grpc.health
    # (None: grpc.health.v1 for services()[0]).
    ready: Callable[[int], Awaitable[bool]] | None = None
    # Whether Envoy routes to it.
    routed: bool = True
    # The scopes of its own service key (PlatformService names without the
    # PLATFORM_SERVICE_ prefix): what it calls on its peers. Every chassis
    # service also follows the key directory.
    key_scopes: tuple[str, ...] = ("KEY_DIRECTORY",)
    # Services whose calls to it are billed elsewhere, so it does not meter
    # them again (the gateway bills the application's key for the traffic it
    # relays to the llm). Their service keys' ids reach it as
    # <env_prefix>UNMETERED_KEY_IDS.
    billed_by: tuple[str, ...] = ()


def _gateway_services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.gateway.v1 import gateway_service_pb2, key_service_pb2, usage_service_pb2

    return [
        key_service_pb2.DESCRIPTOR.services_by_name["KeyService"],
        gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"],
        usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"],
    ]


def _deployer_services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.deployer.v1alpha1 import deployer_service_pb2

    return [deployer_service_pb2.DESCRIPTOR.services_by_name["DeployerService"]]


def _triton_home() -> Path:
    """Where scripts/setup.sh provisioned Triton and its models' environment."""
    return Path(os.environ.get("MLMESH_TRITON_HOME", Path(__file__).resolve().parents[4] / ".envs"))


def _triton_command(ctx: RunContext, port: int) -> list[str]:
    home = _triton_home() / "triton"
    return [
        str(home / "bin" / "tritonserver"),
        f"--model-repository={ctx.state / 'triton-repository'}",
        f"--backend-directory={home / 'backends'}",
        "--model-control-mode=explicit",
        "--load-model=*",  # after a restart: whatever the deployer left live
        f"--grpc-port={port}",
        "--grpc-address=127.0.0.1",
        "--allow-http=false",
        "--allow-metrics=false",
        "--exit-timeout-secs=10",
        "--log-verbose=0",
    ]


def _triton_env(ctx: RunContext) -> dict[str, str]:
    (ctx.state / "triton-repository").mkdir(parents=True, exist_ok=True)
    home = _triton_home()
    return {
        "LD_LIBRARY_PATH": str(home / "triton" / "lib"),
        "MLMESH_TRITON_PYTHONPATH": str(
            home / "triton-models" / "lib" / "python3.11" / "site-packages"
        ),
    }


async def _triton_ready(port: int) -> bool:
    from mlmesh_inference.triton import TritonClient

    async with TritonClient(f"127.0.0.1:{port}") as client:
        return await client.server_ready()


def _registry_services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.registry.v1 import registry_service_pb2

    return [registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]]


def _llm_services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.llm.v1 import llm_service_pb2

    return [llm_service_pb2.DESCRIPTOR.services_by_name["LlmService"]]


# The service that owns the keys (KeyDirectoryService); every other chassis
# service follows its directory.
KEY_DIRECTORY_SERVICE = "gateway"

CATALOG: list[ServiceSpec] = [
    ServiceSpec(
        name="registry",
        command=lambda ctx, port: [sys.executable, "-m", "mlmesh_registry"],
        services=_registry_services,
        # It meters its callers' requests into the gateway's ledger.
        key_scopes=("KEY_DIRECTORY", "USAGE_RECORD"),
        env_prefix="MLMESH_REGISTRY_",
        env=lambda ctx: {
            "MLMESH_REGISTRY_DATABASE_URL": f"sqlite+aiosqlite:///{ctx.state}/registry.db",
            "MLMESH_REGISTRY_ARTIFACT_URL": str(ctx.state / "artifacts"),
        },
    ),
    ServiceSpec(
        name="llm",
        command=lambda ctx, port: [sys.executable, "-m", "mlmesh_llm"],
        services=_llm_services,
        key_scopes=("KEY_DIRECTORY", "REGISTRY_READ", "USAGE_RECORD"),
        billed_by=("gateway",),
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
    ServiceSpec(
        name="triton",
        command=_triton_command,
        services=lambda: [],
        env_prefix="MLMESH_TRITON_",
        env=_triton_env,
        # The python backend stub embeds the system libpython3.11 in isolated
        # mode and finds its standard library from the first python3 on PATH:
        # a virtual environment's there (under `make`) would give it another
        # Python's stdlib and fail on ABI mismatches. So: the system's only.
        fixed_env={"PATH": "/usr/bin:/bin"},
        port_discovery="listening-socket",
        ready=_triton_ready,
        routed=False,  # the gateway and batch jobs call it through mlmesh_inference
        start_timeout=120.0,
    ),
    ServiceSpec(
        name="deployer",
        command=lambda ctx, port: [sys.executable, "-m", "mlmesh_deployer"],
        services=_deployer_services,
        key_scopes=("KEY_DIRECTORY", "REGISTRY_READ", "USAGE_RECORD"),
        env_prefix="MLMESH_DEPLOYER_",
        env=lambda ctx: {
            "MLMESH_DEPLOYER_REGISTRY_TARGET": ctx.address("registry"),
            "MLMESH_DEPLOYER_TRITON_TARGET": ctx.address("triton"),
            "MLMESH_DEPLOYER_REPOSITORY": str(ctx.state / "triton-repository"),
            "MLMESH_DEPLOYER_CACHE_DIR": str(ctx.state / "deployer-cache"),
        },
        # Builds the digits classifier and the MiniLM embedder once and
        # registers them as digits@champion and minilm@champion.
        prepare=lambda ctx: [
            sys.executable,
            "-m",
            "mlmesh_triton.build",
            "all",
            "--out",
            str(ctx.state / "build" / "triton"),
            "--register",
            ctx.address("registry"),
        ],
        start_timeout=300.0,
    ),
    # Last: it routes to the services above. Until it is up, services verify
    # the bootstrap keys they were seeded with.
    ServiceSpec(
        name="gateway",
        command=lambda ctx, port: [sys.executable, "-m", "mlmesh_gateway"],
        services=_gateway_services,
        # Its own key calls the llm replicas and reads the registry; it is
        # the key directory itself.
        key_scopes=("LLM", "REGISTRY_READ"),
        env_prefix="MLMESH_GATEWAY_",
        env=lambda ctx: {
            "MLMESH_GATEWAY_DATABASE_URL": f"sqlite+aiosqlite:///{ctx.state}/gateway.db",
            **(
                {"MLMESH_GATEWAY_REGISTRY_TARGET": ctx.address("registry")}
                if "registry" in ctx.ports
                else {}
            ),
            **(
                {
                    # Every llm replica, in the region the runner placed it.
                    "MLMESH_GATEWAY_LLM_ENDPOINTS": ",".join(
                        f"{ctx.region(i)}={ctx.address(i)}" for i in ctx.instances("llm")
                    ),
                    "MLMESH_GATEWAY_REGION": ctx.region("gateway"),
                }
                if "llm" in ctx.ports
                else {}
            ),
            **(
                {"MLMESH_GATEWAY_TRITON_TARGET": ctx.address("triton")}
                if "triton" in ctx.ports
                else {}
            ),
        },
    ),
]

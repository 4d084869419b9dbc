"""The deployer's registration in the mesh (entry point ``mlmesh.services``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from google.protobuf import descriptor
from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh_chassis.registration import ServiceRegistration, route


def _services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.deployer.v1alpha1 import deployer_service_pb2

    return [deployer_service_pb2.DESCRIPTOR.services_by_name["DeployerService"]]


REGISTRATION = ServiceRegistration(
    name="deployer",
    command=lambda ctx, port: [sys.executable, "-m", "mlmesh_deployer"],
    services=_services,
    routes=(route("/mlmesh.deployer.", {S.PLATFORM_SERVICE_DEPLOYER}),),
    # It follows the registry's aliases onto Triton.
    after=("registry", "triton"),
    key_scopes=("KEY_DIRECTORY", "REGISTRY_READ", "USAGE_RECORD"),
    env_prefix="MLMESH_DEPLOYER_",
    env=lambda ctx: {
        "MLMESH_DEPLOYER_REGISTRY_TARGET": ctx.address("registry"),
        "MLMESH_DEPLOYER_TRITON_TARGET": ctx.address("triton"),
        "MLMESH_DEPLOYER_REPOSITORY": str(ctx.state / "triton-repository"),
        "MLMESH_DEPLOYER_CACHE_DIR": str(ctx.state / "deployer-cache"),
    },
    # Builds the digits classifier, the MiniLM embedder and the digit image
    # encoder once and registers them as digits@champion, minilm@champion
    # and digitclip@champion.
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
)

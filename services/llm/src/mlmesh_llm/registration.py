"""The llm's registration in the mesh (entry point ``mlmesh.services``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from google.protobuf import descriptor
from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh_chassis.registration import ServiceRegistration, route


def _services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.llm.v1 import llm_service_pb2

    return [llm_service_pb2.DESCRIPTOR.services_by_name["LlmService"]]


REGISTRATION = ServiceRegistration(
    name="llm",
    command=lambda ctx, port: [sys.executable, "-m", "mlmesh_llm"],
    services=_services,
    # The gateway's backend: callers generate through GatewayService.
    routes=(route("/mlmesh.llm.v1.LlmService/", {S.PLATFORM_SERVICE_LLM}),),
    # It loads its models from the registry (and registers the tiny one there).
    after=("registry",),
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
)

"""The gateway's registration in the mesh (entry point ``mlmesh.services``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from google.protobuf import descriptor
from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh_chassis.registration import RunContext, ServiceRegistration, route


def _services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.gateway.v1 import gateway_service_pb2, key_service_pb2, usage_service_pb2

    return [
        key_service_pb2.DESCRIPTOR.services_by_name["KeyService"],
        gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"],
        usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"],
    ]


def _unrouted_services() -> Sequence[descriptor.ServiceDescriptor]:
    """The key directory: services reach it on the gateway's socket or port."""
    from mlmesh.gateway.v1 import key_directory_service_pb2

    return [key_directory_service_pb2.DESCRIPTOR.services_by_name["KeyDirectoryService"]]


def _env(ctx: RunContext) -> dict[str, str]:
    env = {
        "MLMESH_GATEWAY_DATABASE_URL": f"sqlite+aiosqlite:///{ctx.state}/gateway.db",
        "MLMESH_GATEWAY_TOKENIZER_CACHE_DIR": str(ctx.state / "gateway-tokenizers"),
    }
    if "registry" in ctx.ports:
        env["MLMESH_GATEWAY_REGISTRY_TARGET"] = ctx.address("registry")
    if "llm" in ctx.ports:
        # Every llm replica, in the region the runner placed it.
        env["MLMESH_GATEWAY_LLM_ENDPOINTS"] = ",".join(
            f"{ctx.region(i)}={ctx.address(i)}" for i in ctx.instances("llm")
        )
        env["MLMESH_GATEWAY_REGION"] = ctx.region("gateway")
    if "triton" in ctx.ports:
        env["MLMESH_GATEWAY_TRITON_TARGET"] = ctx.address("triton")
    if "monitor" in ctx.ports:
        env["MLMESH_GATEWAY_MONITOR_TARGET"] = ctx.address("monitor")
    if "review" in ctx.ports:
        env["MLMESH_GATEWAY_REVIEW_TARGET"] = ctx.address("review")
    if "vllmopenai" in ctx.ports:
        import json

        # vLLM's own OpenAI server (mlmesh_llm.openai_registration) serving the
        # tiny model: every instance in its region, with the upstream's own
        # credential (the file its launcher makes, mode 0600).
        env["MLMESH_GATEWAY_OPENAI_UPSTREAMS"] = json.dumps(
            {
                "tiny-llama-vllm": {
                    "endpoints": [
                        f"{ctx.region(i)}=http://{ctx.address(i)}/v1"
                        for i in ctx.instances("vllmopenai")
                    ],
                    "upstream_model": "tiny-llama",
                    "api_key_file": str(ctx.state / "secrets" / "vllmopenai-api.key"),
                    "tokenizer": "tiny-llama",
                }
            }
        )
        env["MLMESH_GATEWAY_REGION"] = ctx.region("gateway")
    return env


REGISTRATION = ServiceRegistration(
    name="gateway",
    command=lambda ctx, port: [sys.executable, "-m", "mlmesh_gateway"],
    services=_services,
    unrouted_services=_unrouted_services,
    routes=(
        route("/mlmesh.gateway.v1.GatewayService/Generate", {S.PLATFORM_SERVICE_GENERATE}),
        route("/mlmesh.gateway.v1.GatewayService/Infer", {S.PLATFORM_SERVICE_INFER}),
        route("/mlmesh.gateway.v1.GatewayService/Embed", {S.PLATFORM_SERVICE_EMBED}),
        route("/mlmesh.gateway.v1.GatewayService/ListModels", set()),
        route("/mlmesh.gateway.v1.KeyService/", {S.PLATFORM_SERVICE_ADMIN}),
        route("/mlmesh.gateway.v1.KeyDirectoryService/", {S.PLATFORM_SERVICE_KEY_DIRECTORY}),
        route("/mlmesh.gateway.v1.UsageService/RecordUsage", {S.PLATFORM_SERVICE_USAGE_RECORD}),
        # Any key reads its own usage; the servicer asks ADMIN for other keys'.
        route("/mlmesh.gateway.v1.UsageService/GetUsage", set()),
        route("/mlmesh.gateway.v1.UsageService/", {S.PLATFORM_SERVICE_ADMIN}),
    ),
    # Last: it routes to the services it is given. Until it is up, services
    # verify the bootstrap keys they were seeded with.
    after=("registry", "llm", "triton", "deployer", "vllmopenai", "monitor", "review"),
    key_directory=True,
    # The OpenAI-compatible surface (mlmesh_gateway.openai_http).
    http_routes=("/v1/",),
    # Its own key calls the llm replicas, reads the registry, logs sampled
    # predictions to the monitor and submits shadow disagreements to the
    # review queue; it is the key directory itself.
    key_scopes=("LLM", "REGISTRY_READ", "MONITOR_INGEST", "REVIEW_SUBMIT"),
    env_prefix="MLMESH_GATEWAY_",
    env=_env,
)

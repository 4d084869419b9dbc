"""The llm's registration in the mesh (entry point ``mlmesh.services``).

The service runs in its own environment, ``.envs/llm`` (vLLM's CPU build,
its pinned torch and transformers, and the mesh libraries the llm needs),
which scripts/setup.sh provisions with ``mlmesh_llm.provision``; in
production that environment is the llm's own image. The engine that
environment exists for, vLLM, is the default. With ``MLMESH_LLM_ENGINE=cpu``
or ``null`` in the runner's environment the service runs from the runner's
own Python instead, which has torch and transformers too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import descriptor
from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh_chassis.registration import RunContext, ServiceRegistration, route

ROOT = Path(__file__).resolve().parents[4]


def _services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.llm.v1 import llm_service_pb2

    return [llm_service_pb2.DESCRIPTOR.services_by_name["LlmService"]]


def vllm_env() -> Path:
    """Where setup provisioned the llm's environment (MLMESH_LLM_HOME overrides)."""
    return Path(os.environ.get("MLMESH_LLM_HOME", ROOT / ".envs" / "llm"))


def python() -> str:
    """The interpreter the llm runs on: its own environment's for vLLM (the
    default engine), the runner's own for the others."""
    if os.environ.get("MLMESH_LLM_ENGINE", "vllm") != "vllm":
        return sys.executable
    interpreter = vllm_env() / "bin" / "python"
    if not (vllm_env() / "provisioned.json").exists() or not interpreter.exists():
        raise RuntimeError(
            f"the llm's vLLM environment is not provisioned at {vllm_env()}: "
            "run scripts/setup.sh (or `make setup`), or set MLMESH_LLM_ENGINE=cpu "
            "to serve on the hand-written CPU engine"
        )
    return str(interpreter)


def _env(ctx: RunContext) -> dict[str, str]:
    return {
        "MLMESH_LLM_REGISTRY_TARGET": ctx.address("registry"),
        "MLMESH_LLM_CACHE_DIR": str(ctx.state / "llm-cache"),
        # Nothing leaves the machine: no usage reports, no hub downloads.
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }


REGISTRATION = ServiceRegistration(
    name="llm",
    command=lambda ctx, port: [python(), "-m", "mlmesh_llm"],
    services=_services,
    # The gateway's backend: callers generate through GatewayService.
    routes=(route("/mlmesh.llm.v1.LlmService/", {S.PLATFORM_SERVICE_LLM}),),
    # It loads its models from the registry (and registers the tiny one there).
    after=("registry",),
    key_scopes=("KEY_DIRECTORY", "REGISTRY_READ", "USAGE_RECORD"),
    billed_by=("gateway",),
    env_prefix="MLMESH_LLM_",
    env=_env,
    # Builds the small local model once and registers it as tiny-llama@champion
    # (with the service's own transformers, which will load it).
    prepare=lambda ctx: [
        python(),
        "-m",
        "mlmesh_llm.tiny_model",
        "--out",
        str(ctx.state / "build" / "tiny-llama"),
        "--register",
        ctx.address("registry"),
    ],
    # A vLLM engine starts in spawned processes: 25-90 s on a busy 2-core
    # machine, for each replica.
    start_timeout=300.0,
)

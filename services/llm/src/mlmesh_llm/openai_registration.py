"""``vllmopenai`` in the mesh (entry point ``mlmesh.services``): vLLM's own
OpenAI-compatible server (``vllm serve``) for the tiny model, an upstream
the gateway routes to over HTTP (``mlmesh_llm.openai_server`` launches it).

Not routed: Envoy never sends it traffic; the gateway calls it with the
upstream's own credential, a file in the state directory's private
``secrets`` folder (``api_key_file``) that the launcher makes and the
gateway reads. It runs from the llm's environment (``.envs/llm``), where
vLLM is. At scale it is a ``vllm serve`` Deployment behind a Service, its
credential a Secret, reachable from the gateway's pods alone
(deploy/network/network-policies.yaml).

Imported by every service process (for the scopes): nothing heavy here.
"""

from __future__ import annotations

from pathlib import Path

from mlmesh_chassis.registration import RunContext, ServiceRegistration, http_ok

from mlmesh_llm.registration import vllm_env

NAME = "vllmopenai"


def api_key_file(state: Path) -> Path:
    """The upstream's credential (mode 0600; the gateway's registration
    names the same file)."""
    return state / "secrets" / f"{NAME}-api.key"


def _cache(ctx: RunContext) -> Path:
    return ctx.state / f"{NAME}-cache"


def _python() -> str:
    """The llm's environment's interpreter: vLLM runs nowhere else."""
    interpreter = vllm_env() / "bin" / "python"
    if not (vllm_env() / "provisioned.json").exists() or not interpreter.exists():
        raise RuntimeError(
            f"{NAME} runs vLLM from the llm's environment, not provisioned at {vllm_env()}: "
            "run scripts/setup.sh (or `make setup`), or leave it out (mlmesh-run --services)"
        )
    return str(interpreter)


def _command(ctx: RunContext, port: int) -> list[str]:
    return [
        _python(),
        "-m",
        "mlmesh_llm.openai_server",
        "serve",
        "--cache",
        str(_cache(ctx)),
        "--api-key-file",
        str(api_key_file(ctx.state)),
        "--port",
        str(port),
    ]


def _prepare(ctx: RunContext) -> list[str]:
    # The operator's act (the runner gives it the admin key): the version to
    # serve is downloaded before the server starts.
    return [
        _python(),
        "-m",
        "mlmesh_llm.openai_server",
        "fetch",
        "--registry",
        ctx.address("registry"),
        "--cache",
        str(_cache(ctx)),
    ]


async def _ready(port: int) -> bool:
    """vLLM's ``GET /health`` answers 200 (it needs no key)."""
    return await http_ok(port, "/health")


REGISTRATION = ServiceRegistration(
    name=NAME,
    command=_command,
    services=lambda: [],
    env_prefix="MLMESH_VLLMOPENAI_",
    # The llm's prepare step registers the tiny model this one serves.
    after=("registry", "llm"),
    prepare=_prepare,
    port_discovery="listening-socket",
    # The gateway needs only its address: the rest of the mesh starts while
    # vLLM loads.
    start_in_background=True,
    ready=_ready,
    routed=False,  # the gateway calls it (MLMESH_GATEWAY_OPENAI_UPSTREAMS)
    # Three processes (API server, engine core, worker) each import vLLM and
    # torch: 60-95 s measured on a busy 2-core machine.
    start_timeout=300.0,
)

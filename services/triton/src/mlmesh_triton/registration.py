"""Triton's registration in the mesh (entry point ``mlmesh.services``): the
server binary that scripts/setup.sh provisioned, on loopback only."""

from __future__ import annotations

import os
from pathlib import Path

from mlmesh_chassis.registration import RunContext, ServiceRegistration


def _triton_home() -> Path:
    """Where scripts/setup.sh provisioned Triton and its models' environment."""
    return Path(os.environ.get("MLMESH_TRITON_HOME", Path(__file__).resolve().parents[4] / ".envs"))


def _command(ctx: RunContext, port: int) -> list[str]:
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


def _env(ctx: RunContext) -> dict[str, str]:
    (ctx.state / "triton-repository").mkdir(parents=True, exist_ok=True)
    home = _triton_home()
    return {
        "LD_LIBRARY_PATH": str(home / "triton" / "lib"),
        "MLMESH_TRITON_PYTHONPATH": str(
            home / "triton-models" / "lib" / "python3.11" / "site-packages"
        ),
    }


async def _ready(port: int) -> bool:
    from mlmesh_inference.triton import TritonClient

    async with TritonClient(f"127.0.0.1:{port}") as client:
        return await client.server_ready()


REGISTRATION = ServiceRegistration(
    name="triton",
    command=_command,
    services=lambda: [],
    env_prefix="MLMESH_TRITON_",
    env=_env,
    # The python backend stub embeds the system libpython3.11 in isolated
    # mode and finds its standard library from the first python3 on PATH:
    # a virtual environment's there (under `make`) would give it another
    # Python's stdlib and fail on ABI mismatches. So: the system's only.
    fixed_env={"PATH": "/usr/bin:/bin"},
    port_discovery="listening-socket",
    ready=_ready,
    routed=False,  # the gateway and batch jobs call it through mlmesh_inference
    start_timeout=120.0,
)

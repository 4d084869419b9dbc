"""The streaming path's registration in the mesh (entry point
``mlmesh.services``): ``flink``, a foreground supervisor
(``streaming.supervisor``) that runs the standalone Flink cluster and the
job for the features service's definitions, and streams demo events. Not
routed: nothing calls it; the features service loads the job's output.

Imported by every service process (for the scopes): nothing heavy here.
"""

from __future__ import annotations

import os
import sys

from mlmesh_chassis.registration import RunContext, ServiceRegistration, http_ok


def _command(ctx: RunContext, port: int) -> list[str]:
    # The demo streamer runs unless MLMESH_FLINK_DEMO=off (the tests' mesh
    # sends its own events).
    demo = os.environ.get("MLMESH_FLINK_DEMO", "on") != "off"
    return [
        sys.executable,
        "-m",
        "mlmesh_features.streaming.supervisor",
        "--root",
        str(ctx.state / "features"),
        "--home",
        str(ctx.state / "flink"),
        *(["--demo"] if demo else []),
    ]


async def _ready(port: int) -> bool:
    """The supervisor's readiness port answers 200 once the job runs."""
    return await http_ok(port, "/")


REGISTRATION = ServiceRegistration(
    name="flink",
    command=_command,
    services=lambda: [],
    env_prefix="MLMESH_FLINK_",
    # The definitions it compiles are the ones the features service's
    # prepare step applied.
    after=("features",),
    port_discovery="listening-socket",
    ready=_ready,
    routed=False,
    # Starting the JVMs and submitting a PyFlink job takes a while on 2 cores.
    start_timeout=300.0,
)

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

from mlmesh_chassis.registration import RunContext, ServiceRegistration


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
    import asyncio

    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout=2.0
        )
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), timeout=5.0)
        return status.split(b" ")[1:2] == [b"200"]
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


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

"""The monitor's registration in the mesh (entry point ``mlmesh.services``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from google.protobuf import descriptor
from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh_chassis.registration import RunContext, ServiceRegistration, route


def _services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.monitor.v1 import monitor_service_pb2

    return [monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"]]


def _env(ctx: RunContext) -> dict[str, str]:
    root = ctx.state / "monitor"
    env = {
        "MLMESH_MONITOR_ROOT": str(root),
        "MLMESH_MONITOR_DATABASE_URL": f"sqlite+aiosqlite:///{root}/monitor.db",
        "MLMESH_MONITOR_DEMO": "on",
    }
    if "review" in ctx.ports:
        env["MLMESH_MONITOR_REVIEW_TARGET"] = ctx.address("review")
        # The demo classifier: more than 20% of an hour's predictions under
        # 0.6 confident sends them to the review queue.
        env["MLMESH_MONITOR_LOW_CONFIDENCE"] = "digits=0.6:0.2"
    return env


REGISTRATION = ServiceRegistration(
    name="monitor",
    command=lambda ctx, port: [sys.executable, "-m", "mlmesh_monitor"],
    services=_services,
    routes=(
        # The gateway's sampled predictions: service keys holding MONITOR_INGEST.
        route(
            "/mlmesh.monitor.v1.MonitorService/LogPredictions",
            {S.PLATFORM_SERVICE_MONITOR_INGEST},
        ),
        # Feedback, references, and every read.
        route("/mlmesh.monitor.", {S.PLATFORM_SERVICE_MONITOR}),
    ),
    # It sends low-confidence predictions to the review queue.
    after=("review",),
    # It meters its callers' requests into the gateway's ledger, and submits
    # review items.
    key_scopes=("KEY_DIRECTORY", "USAGE_RECORD", "REVIEW_SUBMIT"),
    # The gateway's logging is part of the traffic it bills already.
    billed_by=("gateway",),
    env_prefix="MLMESH_MONITOR_",
    env=_env,
    # One instance owns the database writes (SQLite by default).
    single_writer=True,
)

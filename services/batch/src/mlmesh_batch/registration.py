"""The batch service's registration in the mesh (entry point ``mlmesh.services``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from google.protobuf import descriptor
from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh_chassis.registration import RunContext, ServiceRegistration, route


def _services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.batch.v1 import batch_service_pb2

    return [batch_service_pb2.DESCRIPTOR.services_by_name["BatchService"]]


def _env(ctx: RunContext) -> dict[str, str]:
    root = ctx.state / "batch"
    return {
        "MLMESH_BATCH_ROOT": str(root),
        "MLMESH_BATCH_DATABASE_URL": f"sqlite+aiosqlite:///{root}/batch.db",
        "MLMESH_BATCH_REGISTRY_TARGET": ctx.address("registry"),
        "MLMESH_BATCH_GATEWAY_TARGET": ctx.address("gateway"),
        "MLMESH_BATCH_DEMO": "on",
    }


REGISTRATION = ServiceRegistration(
    name="batch",
    command=lambda ctx, port: [sys.executable, "-m", "mlmesh_batch"],
    services=_services,
    routes=(route("/mlmesh.batch.", {S.PLATFORM_SERVICE_BATCH}),),
    # Its model stages load the registry's versions (the deployer registers
    # minilm and digits), and online stages call the gateway.
    after=("registry", "gateway", "deployer"),
    key_scopes=("KEY_DIRECTORY", "REGISTRY_READ", "USAGE_RECORD"),
    env_prefix="MLMESH_BATCH_",
    env=_env,
    # One instance owns the jobs and their drivers: Envoy sends every write
    # (CreateJob, CancelJob) to it; reads go to any.
    single_writer=True,
)

"""The vector service's registration in the mesh (entry point ``mlmesh.services``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from google.protobuf import descriptor
from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh_chassis.registration import RunContext, ServiceRegistration, route


def _services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.vectors.v1 import vectors_service_pb2

    return [vectors_service_pb2.DESCRIPTOR.services_by_name["VectorService"]]


def _env(ctx: RunContext) -> dict[str, str]:
    env = {"MLMESH_VECTORS_ROOT": str(ctx.state / "vectors"), "MLMESH_VECTORS_DEMO": "on"}
    if "triton" in ctx.ports:
        env["MLMESH_VECTORS_TRITON_TARGET"] = ctx.address("triton")
    if "review" in ctx.ports:
        env["MLMESH_VECTORS_REVIEW_TARGET"] = ctx.address("review")
    return env


REGISTRATION = ServiceRegistration(
    name="vectors",
    command=lambda ctx, port: [sys.executable, "-m", "mlmesh_vectors"],
    services=_services,
    routes=(route("/mlmesh.vectors.", {S.PLATFORM_SERVICE_VECTORS}),),
    # It embeds texts and images with the models the deployer puts on Triton.
    # Near-threshold content checks go to the review queue.
    after=("triton", "deployer", "review"),
    # It meters its callers' requests into the gateway's ledger, and submits
    # near-threshold content checks to the review queue.
    key_scopes=("KEY_DIRECTORY", "USAGE_RECORD", "REVIEW_SUBMIT"),
    env_prefix="MLMESH_VECTORS_",
    env=_env,
    # With replicas (mlmesh-run --replicas vectors=N), the first instance owns
    # the embedded engine's data and takes the writes; the others serve reads.
    single_writer=True,
)

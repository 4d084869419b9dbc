"""The feature service's registration in the mesh (entry point ``mlmesh.services``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from google.protobuf import descriptor
from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh_chassis.registration import ServiceRegistration, route


def _services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.features.v1 import features_service_pb2

    return [features_service_pb2.DESCRIPTOR.services_by_name["FeatureService"]]


REGISTRATION = ServiceRegistration(
    name="features",
    command=lambda ctx, port: [sys.executable, "-m", "mlmesh_features"],
    services=_services,
    routes=(route("/mlmesh.features.", {S.PLATFORM_SERVICE_FEATURES}),),
    # It meters its callers' requests into the gateway's ledger.
    key_scopes=("KEY_DIRECTORY", "USAGE_RECORD"),
    env_prefix="MLMESH_FEATURES_",
    env=lambda ctx: {
        "MLMESH_FEATURES_ROOT": str(ctx.state / "features"),
        # Loads the Flink job's output (the flink service runs the job).
        "MLMESH_FEATURES_STREAMING": "on",
    },
    # Generates the demo purchases, applies the demo feature repository and
    # materializes it (mlmesh_features/demo), before the service starts.
    prepare=lambda ctx: [
        sys.executable,
        "-m",
        "mlmesh_features.demo",
        "--root",
        str(ctx.state / "features"),
    ],
)

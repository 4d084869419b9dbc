"""The review service's registration in the mesh (entry point ``mlmesh.services``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from google.protobuf import descriptor
from mlmesh.gateway.v1.gateway_pb2 import PlatformService as S
from mlmesh_chassis.registration import RunContext, ServiceRegistration, route

_SERVICE = "/mlmesh.review.v1.ReviewService/"


def _services() -> Sequence[descriptor.ServiceDescriptor]:
    from mlmesh.review.v1 import review_service_pb2

    return [review_service_pb2.DESCRIPTOR.services_by_name["ReviewService"]]


def _env(ctx: RunContext) -> dict[str, str]:
    root = ctx.state / "review"
    return {
        "MLMESH_REVIEW_ROOT": str(root),
        "MLMESH_REVIEW_DATABASE_URL": f"sqlite+aiosqlite:///{root}/review.db",
        "MLMESH_REVIEW_REGISTRY_TARGET": ctx.address("registry"),
    }


REGISTRATION = ServiceRegistration(
    name="review",
    command=lambda ctx, port: [sys.executable, "-m", "mlmesh_review"],
    services=_services,
    # First match wins: the two per-method routes before the service's.
    routes=(
        # Sources (service keys: the gateway, the monitor, the vector service).
        route(f"{_SERVICE}SubmitItems", {S.PLATFORM_SERVICE_REVIEW_SUBMIT}),
        # Users of the models report what they got.
        route(
            f"{_SERVICE}ReportPrediction",
            {S.PLATFORM_SERVICE_GENERATE, S.PLATFORM_SERVICE_INFER, S.PLATFORM_SERVICE_EMBED},
        ),
        # Reviewers: list, get, claim, verdict, escalate, export.
        route("/mlmesh.review.", {S.PLATFORM_SERVICE_REVIEW}),
    ),
    # Exports are uploaded to the registry.
    after=("registry",),
    key_scopes=("KEY_DIRECTORY", "USAGE_RECORD", "REGISTRY"),
    env_prefix="MLMESH_REVIEW_",
    env=_env,
    # The reviewers' page (mlmesh_review.web), on the service's HTTP port.
    http_routes=("/review/",),
    # One instance owns the queue's SQLite database.
    single_writer=True,
)

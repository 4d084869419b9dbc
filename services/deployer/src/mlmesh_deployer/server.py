"""build_server(settings): the deployer and its status service.

Health is NOT_SERVING until every followed model is live on Triton.
"""

from __future__ import annotations

from mlmesh.deployer.v1alpha1 import deployer_service_pb2_grpc
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_DEPLOYER
from mlmesh_chassis.server import ServiceHost, start_service
from mlmesh_inference.triton import TritonClient
from mlmesh_metering.metering import metered_calls
from mlmesh_sdk.snapshot import UnpackLimits

from mlmesh_deployer.config import DeployerSettings
from mlmesh_deployer.deployer import TritonDeployer
from mlmesh_deployer.registration import REGISTRATION
from mlmesh_deployer.servicer import DeployerServicer
from mlmesh_deployer.telemetry import export_triton_stats


async def build_server(settings: DeployerSettings) -> ServiceHost:
    triton = TritonClient(settings.triton_target)
    deployer = TritonDeployer(
        settings.references(),
        settings.registry_target,
        triton,
        settings.repository,
        settings.cache_dir,
        reconcile_seconds=settings.reconcile_seconds,
        load_timeout_s=settings.load_timeout_seconds,
        retry_seconds=settings.retry_seconds,
        max_retry_seconds=settings.max_retry_seconds,
        unpack_limits=UnpackLimits(settings.unpack_max_members, settings.unpack_max_bytes),
    )

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        deployer_service_pb2_grpc.add_DeployerServiceServicer_to_server(
            DeployerServicer(deployer), server
        )
        return REGISTRATION.service_names()

    admission, meter = metered_calls(settings, PLATFORM_SERVICE_DEPLOYER)
    # SERVING once every followed model is live on Triton.
    host = await start_service(
        settings,
        register,
        error_domain="mlmesh.deployer",
        ready=deployer.ready.wait,
        admission=admission,
    )
    host.on_close.append(triton.close)
    host.on_close.append(export_triton_stats(settings.triton_target))
    if meter is not None:
        host.on_close.append(meter.close)
    host.on_close.append(deployer.stop)
    await deployer.start()
    return host

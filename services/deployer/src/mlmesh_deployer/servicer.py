"""DeployerService: what is live on Triton."""

from __future__ import annotations

from mlmesh.deployer.v1alpha1 import deployer_service_pb2 as rpc
from mlmesh.deployer.v1alpha1 import deployer_service_pb2_grpc
from mlmesh_chassis.pagination import offset_page

from mlmesh_deployer.deployer import State, TritonDeployer

_STATES = {
    State.LOADING: rpc.DEPLOYMENT_STATE_LOADING,
    State.READY: rpc.DEPLOYMENT_STATE_READY,
    State.FAILED: rpc.DEPLOYMENT_STATE_FAILED,
}


class DeployerServicer(deployer_service_pb2_grpc.DeployerServiceServicer):
    def __init__(self, deployer: TritonDeployer) -> None:
        self.deployer = deployer

    async def ListDeployments(self, request, context):  # type: ignore[no-untyped-def]
        items = sorted(self.deployer.deployments, key=lambda d: d.model)
        deployments, token = offset_page(items, request.page_size, request.page_token)
        page = []
        for deployment in deployments:
            message = rpc.Deployment(
                reference=deployment.reference,
                triton_model=deployment.model,
                live_version=deployment.live_version,
                target_version=deployment.target_version,
                state=_STATES[deployment.state],
                message=deployment.message,
                experiment_versions=sorted(deployment.experiment_versions),
            )
            message.update_time.FromDatetime(deployment.update_time)
            page.append(message)
        return rpc.ListDeploymentsResponse(deployments=page, next_page_token=token)

"""BatchService: the RPCs over the supervisor's jobs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from mlmesh.batch.v1 import batch_pb2 as pb
from mlmesh.batch.v1 import batch_service_pb2 as rpc
from mlmesh.batch.v1 import batch_service_pb2_grpc
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh_chassis.auth import current_principal
from mlmesh_chassis.errors import FailedPrecondition, InvalidArgument

from mlmesh_batch import callables
from mlmesh_batch.jobs import FINAL, STATE_NAMES, Supervisor, new_job_id, to_proto
from mlmesh_batch.plan import JobPlan
from mlmesh_batch.validation import Limits, plan_job

RESUMABLE = {"FAILED", "CANCELLED"}


def _job_id(name: str) -> str:
    return name.removeprefix("jobs/")


def _caller_key(context: Any) -> str:
    """The caller's own key (verified by the chassis before this runs), for
    online stages: it is held in memory while the job runs, never stored."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and value.startswith("Bearer "):
            return str(value.removeprefix("Bearer ").strip())
    return ""


def _request_hash(request: rpc.CreateJobRequest) -> str:
    copy = rpc.CreateJobRequest()
    copy.CopyFrom(request)
    copy.request_id = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def _operation(row: Any) -> rpc.Operation:
    return rpc.Operation(name=f"jobs/{row.id}", metadata=to_proto(row), done=row.state in FINAL)


class BatchServicer(batch_service_pb2_grpc.BatchServiceServicer):
    def __init__(
        self,
        supervisor: Supervisor,
        limits: Limits,
        resolve: Callable[[ModelReference], Any],
    ) -> None:
        self.supervisor = supervisor
        self.limits = limits
        self.resolve = resolve

    async def CreateJob(self, request, context):  # type: ignore[no-untyped-def]
        owner = current_principal().key_id
        if request.resume_from:
            return await self._resume(request, owner, context)
        if not request.HasField("job"):
            raise InvalidArgument.field("job", "is required (or resume_from)")
        job = pb.Job()
        job.CopyFrom(request.job)
        for name in ("name", "state", "progress", "error", "resumed_from", "attempts"):
            job.ClearField(name)
        for name in ("create_time", "start_time", "end_time"):
            job.ClearField(name)
        job_id = new_job_id()
        plan = await plan_job(job_id, job, self.limits, self.resolve)
        row = await self.supervisor.create(
            owner, request.request_id, _request_hash(request), job, plan, "", _caller_key(context)
        )
        return rpc.CreateJobResponse(operation=_operation(row))

    async def _resume(self, request, owner: str, context):  # type: ignore[no-untyped-def]
        old = await self.supervisor.get(owner, _job_id(request.resume_from))
        if old.state not in RESUMABLE:
            raise FailedPrecondition(
                f"{request.resume_from} is {old.state}: only a FAILED or CANCELLED job resumes",
                job=request.resume_from,
            )
        job = pb.Job.FromString(old.spec)
        if request.job.display_name:
            job.display_name = request.job.display_name
        job_id = new_job_id()
        checked = await plan_job(job_id, job, self.limits, self.resolve, resuming=True)
        previous = JobPlan.from_json(old.plan)
        # The resumed job runs the versions the first one pinned.
        plan = JobPlan(**{**checked.__dict__, "stages": previous.stages})
        row = await self.supervisor.create(
            owner,
            request.request_id,
            _request_hash(request),
            job,
            plan,
            f"jobs/{old.id}",
            _caller_key(context),
        )
        return rpc.CreateJobResponse(operation=_operation(row))

    async def GetJob(self, request, context):  # type: ignore[no-untyped-def]
        row = await self.supervisor.get(current_principal().key_id, _job_id(request.name))
        return rpc.GetJobResponse(job=to_proto(row))

    async def ListJobs(self, request, context):  # type: ignore[no-untyped-def]
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        state = STATE_NAMES.get(request.state, "")
        rows, token = await self.supervisor.list(
            current_principal().key_id, state, request.page_size, request.page_token
        )
        return rpc.ListJobsResponse(jobs=[to_proto(r) for r in rows], next_page_token=token)

    async def CancelJob(self, request, context):  # type: ignore[no-untyped-def]
        row = await self.supervisor.cancel(current_principal().key_id, _job_id(request.name))
        return rpc.CancelJobResponse(job=to_proto(row))

    async def WatchJob(self, request, context):  # type: ignore[no-untyped-def]
        owner = current_principal().key_id
        async for row in self.supervisor.watch(owner, _job_id(request.name)):
            yield rpc.WatchJobResponse(job=to_proto(row))

    async def ListCallables(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.ListCallablesResponse(
            callables=[
                rpc.Callable(name=c.name, description=c.description)
                for c in callables.REGISTERED.values()
            ]
        )

"""Jobs: their rows in the service's database, and the supervisor that runs
their drivers.

**Durable.** A job is a row (db.py) from CreateJob on: its spec, its plan
(pinned model versions), its state, its latest progress, its error. The
supervisor starts a QUEUED job's driver (driver.py) as a process in a
session of its own and follows it through ``status.json``: progress goes to
the row, each new committed part is billed to the job's key (one usage event
per part, ``batch-<job>-part-<n>``: a repeat is the same event), and the
driver's end state becomes the job's.

**Restarts.** When the service starts it looks at every RUNNING or
CANCELLING job: a driver still alive (the service was killed, the driver was
not) is re-attached and followed as before; a dead one is started again
(``attempts`` + 1), and skips the rows its committed parts hold. After
``max_attempts`` the job FAILS with the reason. A job with online stages
needs its submitter's key, which is never stored: if its driver is gone it
FAILS with FAILED_PRECONDITION, to be resumed by CreateJob(resume_from) with
a key. A graceful shutdown stops the drivers (the jobs stay RUNNING and are
resumed by the next start) and the local Ray head.

**Cancel** sends SIGTERM to the driver's process group; it stops at once
(parts committed stay), or is killed after ``cancel_grace_seconds``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from mlmesh.batch.v1 import batch_pb2 as pb
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_BATCH
from mlmesh_chassis.database import Database
from mlmesh_chassis.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
)
from mlmesh_chassis.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from mlmesh_metering.metering import Metering

from mlmesh_batch import cluster
from mlmesh_batch.config import BatchSettings
from mlmesh_batch.db import jobs as table
from mlmesh_batch.driver import CALLER_KEY_ENV, DriverConfig, Status, read_status
from mlmesh_batch.plan import JobPlan

log = logging.getLogger("mlmesh.batch.jobs")

QUEUED, RUNNING, CANCELLING = "QUEUED", "RUNNING", "CANCELLING"
SUCCEEDED, SUCCEEDED_WITH_ERRORS, FAILED, CANCELLED = (
    "SUCCEEDED",
    "SUCCEEDED_WITH_ERRORS",
    "FAILED",
    "CANCELLED",
)
FINAL = {SUCCEEDED, SUCCEEDED_WITH_ERRORS, FAILED, CANCELLED}
ACTIVE = {QUEUED, RUNNING, CANCELLING}
STATES = {
    QUEUED: pb.JOB_STATE_QUEUED,
    RUNNING: pb.JOB_STATE_RUNNING,
    CANCELLING: pb.JOB_STATE_CANCELLING,
    SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    SUCCEEDED_WITH_ERRORS: pb.JOB_STATE_SUCCEEDED_WITH_ERRORS,
    FAILED: pb.JOB_STATE_FAILED,
    CANCELLED: pb.JOB_STATE_CANCELLED,
}
STATE_NAMES = {v: k for k, v in STATES.items()}
CODES = {
    "CANCELLED": 1,
    "INVALID_ARGUMENT": 3,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_job_id() -> str:
    return secrets.token_hex(8)


def _timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def to_proto(row: Any) -> pb.Job:
    job = pb.Job.FromString(row.spec)
    job.name = f"jobs/{row.id}"
    job.display_name = row.display_name
    job.state = STATES[row.state]
    job.resumed_from = row.resumed_from
    job.attempts = row.attempts
    progress = json.loads(row.progress or "{}")
    job.progress.CopyFrom(
        pb.JobProgress(
            rows_total=progress.get("rows_total", 0),
            rows_done=progress.get("rows_done", 0),
            rows_failed=progress.get("rows_failed", 0),
            rows_skipped=progress.get("rows_skipped", 0),
            rows_per_second=progress.get("rows_per_second", 0.0),
            eta_seconds=progress.get("eta_seconds", 0.0),
            first_part_seconds=progress.get("first_part_seconds", 0.0),
            parts=progress.get("part_count", 0),
            stages=[pb.StageProgress(**stage) for stage in progress.get("stages", [])],
        )
    )
    error = json.loads(row.error or "{}")
    if error:
        job.error.CopyFrom(
            status_pb2.Status(
                code=CODES.get(error.get("code", ""), 2), message=error.get("message", "")
            )
        )
        job.error.details.add().Pack(
            error_details_pb2.ErrorInfo(
                reason=error.get("reason", "INTERNAL"),
                domain="mlmesh.batch",
                metadata={"job": f"jobs/{row.id}"},
            )
        )
    for name in ("create_time", "start_time", "end_time"):
        stamp = _timestamp(getattr(row, name))
        if stamp is not None:
            getattr(job, name).CopyFrom(stamp)
    return job


def _page_token(row: Any) -> str:
    created = row.create_time.replace(tzinfo=None).isoformat()
    return base64.urlsafe_b64encode(json.dumps([created, row.id]).encode()).decode()


def _after(token: str) -> tuple[dt.datetime, str] | None:
    if not token:
        return None
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return dt.datetime.fromisoformat(created), str(job_id)[:32]
    except (ValueError, TypeError):
        raise InvalidArgument.field("page_token", "is not a token this list returned") from None


@dataclass
class _Running:
    """A driver this service follows."""

    job_id: str
    pid: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None  # None: re-attached after a restart
    cancel_sent: float = 0.0
    last_progress: str = ""
    exited_at: float = 0.0


@dataclass
class Supervisor:
    settings: BatchSettings
    database: Database
    meter: Metering | None = None
    running: dict[str, _Running] = field(default_factory=dict)
    caller_keys: dict[str, str] = field(default_factory=dict)  # online jobs' keys, memory only
    _cluster: cluster.RayCluster | None = None
    _task: asyncio.Task[None] | None = None
    _idle_since: float = 0.0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    # ---- lifecycle -------------------------------------------------------

    @property
    def jobs_root(self) -> Path:
        return self.settings.root / "jobs"

    async def start(self) -> None:
        self.jobs_root.mkdir(parents=True, exist_ok=True)
        await self._recover()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        """Graceful shutdown: the drivers stop (their jobs stay RUNNING and
        resume at the next start), then the local Ray head."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for run in list(self.running.values()):
            _signal_group(run.pid, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + self.settings.cancel_grace_seconds
        while any(_alive(r.pid, r.job_id) for r in self.running.values()):
            if asyncio.get_running_loop().time() > deadline:
                for run in self.running.values():
                    _signal_group(run.pid, signal.SIGKILL)
                break
            await asyncio.sleep(0.1)
        for run in self.running.values():
            if run.process is not None:
                with contextlib.suppress(Exception):
                    run.process.wait(timeout=1)
        if not self.settings.ray_address:
            await asyncio.to_thread(cluster.stop_local_head, self.settings.root / "ray")

    async def _cluster_for_jobs(self) -> cluster.RayCluster:
        if self._cluster is None:
            if self.settings.ray_address:
                token = str(self.settings.ray_token_file or "")
                self._cluster = cluster.RayCluster(self.settings.ray_address, token)
            else:
                self._cluster = await asyncio.to_thread(
                    cluster.start_local_head, self.settings.root / "ray", self.settings.cores + 2
                )
        return self._cluster

    # ---- calls ------------------------------------------------------------

    async def create(
        self,
        owner: str,
        request_id: str,
        request_hash: str,
        job: pb.Job,
        plan: JobPlan,
        resumed_from: str,
        caller_key: str,
    ) -> Any:
        idempotency = f"{owner}:{request_id}" if request_id else f"job:{plan.job_id}"
        stamp = now()
        async with self.database.write() as conn:
            if request_id:
                existing = (
                    await conn.execute(sa.select(table).where(table.c.idempotency == idempotency))
                ).first()
                if existing is not None:
                    if existing.request_hash != request_hash:
                        raise AlreadyExists("job request", request_id)
                    return existing
            active = (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(table)
                    .where(table.c.owner == owner, table.c.state.in_(ACTIVE))
                )
            ).scalar_one()
            if active >= self.settings.max_active_jobs_per_key:
                raise ResourceExhausted(
                    f"the key has {active} jobs queued or running (at most "
                    f"{self.settings.max_active_jobs_per_key})",
                    [QuotaViolation(f"key:{owner}", "active batch jobs per key")],
                    30.0,
                )
            for other in (
                await conn.execute(
                    sa.select(table.c.id, table.c.plan).where(table.c.state.in_(ACTIVE))
                )
            ).all():
                if JobPlan.from_json(other.plan).output_uri == plan.output_uri:
                    raise FailedPrecondition(
                        f"job {other.id} is writing to that output", job=f"jobs/{other.id}"
                    )
            await conn.execute(
                table.insert().values(
                    id=plan.job_id,
                    owner=owner,
                    idempotency=idempotency,
                    request_hash=request_hash,
                    display_name=job.display_name,
                    spec=job.SerializeToString(),
                    plan=plan.to_json(),
                    state=QUEUED,
                    progress="{}",
                    error="{}",
                    resumed_from=resumed_from,
                    attempts=0,
                    driver_pid=0,
                    billed_through=0,
                    cancel_requested=False,
                    create_time=stamp,
                    start_time=None,
                    end_time=None,
                    update_time=stamp,
                )
            )
            row = (await conn.execute(sa.select(table).where(table.c.id == plan.job_id))).one()
        if plan.online:
            self.caller_keys[plan.job_id] = caller_key
        self._wake.set()
        return row

    async def get(self, owner: str, job_id: str) -> Any:
        async with self.database.read() as conn:
            row = (await conn.execute(sa.select(table).where(table.c.id == job_id))).first()
        if row is None or row.owner != owner:
            raise NotFound("job", f"jobs/{job_id}")
        return row

    async def list(
        self, owner: str, state: str, page_size: int, token: str
    ) -> tuple[list[Any], str]:
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query = sa.select(table).where(table.c.owner == owner)
        if state:
            query = query.where(table.c.state == state)
        after = _after(token)
        if after is not None:
            created, job_id = after
            query = query.where(
                sa.or_(
                    table.c.create_time < created,
                    sa.and_(table.c.create_time == created, table.c.id < job_id),
                )
            )
        query = query.order_by(table.c.create_time.desc(), table.c.id.desc()).limit(size + 1)
        async with self.database.read() as conn:
            rows = (await conn.execute(query)).all()
        more = len(rows) > size
        rows = rows[:size]
        return list(rows), _page_token(rows[-1]) if more and rows else ""

    async def cancel(self, owner: str, job_id: str) -> Any:
        row = await self.get(owner, job_id)
        if row.state in FINAL:
            return row
        async with self.database.write() as conn:
            if row.state == QUEUED:
                await conn.execute(
                    table.update()
                    .where(table.c.id == job_id, table.c.state == QUEUED)
                    .values(
                        state=CANCELLED,
                        cancel_requested=True,
                        error=json.dumps(_cancelled()),
                        end_time=now(),
                        update_time=now(),
                    )
                )
            await conn.execute(
                table.update()
                .where(table.c.id == job_id, table.c.state == RUNNING)
                .values(state=CANCELLING, cancel_requested=True, update_time=now())
            )
        self._wake.set()
        return await self.get(owner, job_id)

    async def watch(self, owner: str, job_id: str) -> AsyncIterator[Any]:
        """The job now, then on every change; ends after a final state."""
        last = None
        while True:
            row = await self.get(owner, job_id)
            marker = (row.state, row.progress, row.attempts)
            if marker != last:
                last = marker
                yield row
            if row.state in FINAL:
                return
            await asyncio.sleep(max(self.settings.poll_seconds, 0.2))

    # ---- the supervisor --------------------------------------------------

    async def _recover(self) -> None:
        async with self.database.read() as conn:
            rows = (
                await conn.execute(sa.select(table).where(table.c.state.in_({RUNNING, CANCELLING})))
            ).all()
        for row in rows:
            folder = self.jobs_root / row.id
            if row.driver_pid and _alive(row.driver_pid, row.id):
                log.info("job %s: re-attached to its driver (pid %d)", row.id, row.driver_pid)
                self.running[row.id] = _Running(row.id, row.driver_pid, folder)
            else:
                log.info("job %s: its driver is gone; it will be started again", row.id)
                await self._driver_gone(row)

    async def _loop(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the supervisor goes on; the next tick retries
                log.exception("supervisor tick failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)

    async def _tick(self) -> None:
        for run in list(self.running.values()):
            await self._follow(run)
        await self._stop_idle_head()
        if len(self.running) < self.settings.max_running_jobs:
            async with self.database.read() as conn:
                queued = (
                    await conn.execute(
                        sa.select(table)
                        .where(table.c.state == QUEUED)
                        .order_by(table.c.create_time)
                        .limit(self.settings.max_running_jobs - len(self.running))
                    )
                ).all()
            for row in queued:
                await self._launch(row)

    async def _stop_idle_head(self) -> None:
        """Stops the local head after ``ray_idle_stop_seconds`` without jobs."""
        limit = self.settings.ray_idle_stop_seconds
        if not limit or self.settings.ray_address or self._cluster is None:
            return
        loop_time = asyncio.get_running_loop().time()
        if self.running:
            self._idle_since = 0.0
            return
        self._idle_since = self._idle_since or loop_time
        if loop_time - self._idle_since >= limit:
            log.info("no job for %.0f s: stopping the local Ray head", limit)
            self._cluster, self._idle_since = None, 0.0
            await asyncio.to_thread(cluster.stop_local_head, self.settings.root / "ray")

    async def _launch(self, row: Any, attempt: int | None = None) -> None:
        plan = JobPlan.from_json(row.plan)
        if plan.online and row.id not in self.caller_keys:
            await self._finish(
                row.id,
                FAILED,
                {
                    "code": "FAILED_PRECONDITION",
                    "reason": "FAILED_PRECONDITION",
                    "message": "its driver stopped and its online stages need the submitter's key, "
                    "which is never stored: resume it with CreateJob(resume_from)",
                },
            )
            return
        ray = await self._cluster_for_jobs()
        folder = self.jobs_root / row.id
        attempt = attempt or row.attempts + 1
        config = self._driver_config(plan, attempt, ray)
        env = {**os.environ, **ray.env(), "PYTHONUNBUFFERED": "1"}
        env.pop(CALLER_KEY_ENV, None)
        if plan.online:
            env[CALLER_KEY_ENV] = self.caller_keys[row.id]
        process = await asyncio.to_thread(_spawn_driver, folder, config, env)
        async with self.database.write() as conn:
            await conn.execute(
                table.update()
                .where(table.c.id == row.id)
                .values(
                    state=CANCELLING if row.state == CANCELLING else RUNNING,
                    attempts=attempt,
                    driver_pid=process.pid,
                    start_time=row.start_time or now(),
                    update_time=now(),
                )
            )
        self.running[row.id] = _Running(row.id, process.pid, folder, process)
        log.info("job %s: driver started (pid %d, attempt %d)", row.id, process.pid, attempt)

    def _driver_config(self, plan: JobPlan, attempt: int, ray: cluster.RayCluster) -> DriverConfig:
        key_file = self.settings.service_key_file
        return DriverConfig(
            plan=plan,
            attempt=attempt,
            ray_address=ray.address,
            cores=self.settings.cores,
            registry_target=self.settings.registry_target,
            gateway_target=self.settings.gateway_target,
            cache_root=os.path.abspath(self.settings.root / "models"),
            # Absolute, not resolved: on Kubernetes the key is a mounted
            # Secret whose resolved path exists only in this pod.
            service_key_file=os.path.abspath(key_file) if key_file else "",
            allowed_roots=[str(p) for p in self.settings.roots()],
            allowed_protocols=self.settings.protocols(),
        )

    async def _follow(self, run: _Running) -> None:
        status = await asyncio.to_thread(read_status, run.folder)
        async with self.database.read() as conn:
            row = (await conn.execute(sa.select(table).where(table.c.id == run.job_id))).one()
        if row.state == CANCELLING and not run.cancel_sent:
            run.cancel_sent = asyncio.get_running_loop().time()
            _signal_group(run.pid, signal.SIGTERM)
        if status is not None and status.attempt == row.attempts:
            await self._record(row, status)
            if status.state in ("succeeded", "failed", "cancelled"):
                await self._ended(run, row, status)
                return
        exited = (
            run.process.poll() is not None
            if run.process is not None
            else not _alive(run.pid, run.job_id)
        )
        loop_time = asyncio.get_running_loop().time()
        if run.cancel_sent and loop_time - run.cancel_sent > self.settings.cancel_grace_seconds:
            _signal_group(run.pid, signal.SIGKILL)
            exited = True
        if exited:
            # Its last status may land just after it exits: one more look.
            if not run.exited_at:
                run.exited_at = loop_time
                return
            self.running.pop(run.job_id, None)
            if row.state == CANCELLING:
                await self._finish(row.id, CANCELLED, _cancelled())
            else:
                log.warning("job %s: its driver (pid %d) died", row.id, run.pid)
                await self._driver_gone(row)

    async def _record(self, row: Any, status: Status) -> None:
        progress = json.dumps(
            {
                k: v
                for k, v in status.__dict__.items()
                if k not in ("parts", "error", "pid", "updated")
            }
        )
        billed = row.billed_through
        for number, rows in status.parts:
            if number <= billed:
                continue
            if self.meter is not None:
                plan = JobPlan.from_json(row.plan)
                model = next((s.model for s in plan.stages if s.kind == "model"), "")
                await self.meter.record(
                    row.owner,
                    call_id=f"batch-{row.id}-part-{number}",
                    request_id="",
                    model=model,
                    unit="rows",
                    quantity=int(rows),
                    service=PLATFORM_SERVICE_BATCH,
                )
            billed = number
        if progress != row.progress or billed != row.billed_through:
            async with self.database.write() as conn:
                await conn.execute(
                    table.update()
                    .where(table.c.id == row.id)
                    .values(progress=progress, billed_through=billed, update_time=now())
                )

    async def _ended(self, run: _Running, row: Any, status: Status) -> None:
        self.running.pop(run.job_id, None)
        if run.process is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(run.process.wait, 10)
        if status.state == "succeeded":
            state = SUCCEEDED_WITH_ERRORS if status.rows_failed else SUCCEEDED
            await self._finish(row.id, state, {})
        elif status.state == "cancelled":
            await self._finish(row.id, CANCELLED, _cancelled())
        else:
            await self._finish(row.id, FAILED, status.error)

    async def _driver_gone(self, row: Any) -> None:
        if row.state == CANCELLING or row.cancel_requested:
            await self._finish(row.id, CANCELLED, _cancelled())
            return
        if row.attempts >= self.settings.max_attempts:
            await self._finish(
                row.id,
                FAILED,
                {
                    "code": "ABORTED",
                    "reason": "INTERNAL",
                    "message": f"its driver died {row.attempts} times; the parts written stay "
                    "(resume it with CreateJob(resume_from))",
                },
            )
            return
        await self._launch(row, attempt=row.attempts + 1)

    async def _finish(self, job_id: str, state: str, error: dict[str, str]) -> None:
        async with self.database.write() as conn:
            await conn.execute(
                table.update()
                .where(table.c.id == job_id)
                .values(state=state, error=json.dumps(error), end_time=now(), update_time=now())
            )
        self.caller_keys.pop(job_id, None)
        log.info("job %s: %s", job_id, state)


def _spawn_driver(
    folder: Path, config: DriverConfig, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "driver.json").write_text(config.to_json())
    (folder / "status.json").unlink(missing_ok=True)
    with (folder / "driver.log").open("ab") as logfile:
        return subprocess.Popen(
            [sys.executable, "-m", "mlmesh_batch.driver", str(folder)],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives a crash of the service
        )


def _cancelled() -> dict[str, str]:
    return {
        "code": "CANCELLED",
        "reason": "OPERATION_CANCELLED",
        "message": "cancelled by CancelJob",
    }


def _alive(pid: int, job_id: str) -> bool:
    """Whether ``pid`` is the driver of ``job_id`` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False  # a zombie: exited, not yet reaped
    return b"mlmesh_batch.driver" in cmdline and job_id.encode() in cmdline


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)

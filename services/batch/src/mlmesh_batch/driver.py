"""A job's driver: the process that runs its Ray Data pipeline.

    python -m mlmesh_batch.driver JOB_DIR

The service starts one per running job, in a session of its own, so the
driver outlives a restart of the service (which then re-attaches to it).
``JOB_DIR`` holds ``driver.json`` (the plan and where things are) and the
driver writes ``status.json`` there, replaced atomically after every
committed part and at least every second: the service reads it for progress,
billing (per committed part) and the end state. The submitter's key, for
online stages, comes in the environment (``MLMESH_BATCH_CALLER_KEY``), never
on disk.

The pipeline is a streaming read (parquet or JSON lines, cut into blocks of
a few thousand rows so several actors get work), a skip of the ids a resumed
job already wrote, then per stage ``map_batches``: callables in tasks, models
in an actor pool (each actor loads its model once), online stages in a small
pool of calling actors. The driver iterates over the results as they come
and commits them in parts (storage.py). Ray retries a failed task and
restarts a dead actor; an id already committed is never written twice (the
driver drops repeats), so a retried batch adds no row twice.

SIGTERM (CancelJob) stops the driver at once: parts committed stay, the end
state is CANCELLED.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mlmesh_batch import storage
from mlmesh_batch.plan import (
    BUSY_PREFIX,
    ERROR_MESSAGE,
    ERROR_REASON,
    ERROR_STAGE,
    IN_PROCESS,
    INPUT_ROW,
    ONLINE,
    JobPlan,
)

log = logging.getLogger("mlmesh.batch.driver")
CALLER_KEY_ENV = "MLMESH_BATCH_CALLER_KEY"
# The CPUs (Ray's scheduling unit) a light step takes: reads, the row
# bookkeeping, callables.
LIGHT = 0.2


class Cancelled(BaseException):
    """SIGTERM: the job was cancelled."""


class TooManyFailures(Exception):
    pass


@dataclass
class DriverConfig:
    plan: JobPlan
    attempt: int
    ray_address: str  # the cluster's GCS; "" : a private local Ray for this driver
    # The cores model actors share (their torch threads: cores / concurrency
    # each, unless a stage sets num_cpus).
    cores: int
    registry_target: str
    gateway_target: str
    cache_root: str
    service_key_file: str
    allowed_roots: list[str]
    allowed_protocols: list[str]

    def to_json(self) -> str:
        data = dict(self.__dict__)
        data["plan"] = json.loads(self.plan.to_json())
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> DriverConfig:
        data = json.loads(text)
        data["plan"] = JobPlan.from_json(json.dumps(data["plan"]))
        return cls(**data)


@dataclass
class Status:
    """What status.json holds."""

    state: str = "starting"  # starting, running, succeeded, failed, cancelled
    attempt: int = 0
    pid: int = 0
    rows_total: int = 0
    rows_done: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    rows_per_second: float = 0.0
    eta_seconds: float = 0.0
    first_part_seconds: float = 0.0
    # Parts this attempt committed: [number, rows (good + failed)], for billing.
    parts: list[list[int]] = field(default_factory=list)
    part_count: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, str] = field(default_factory=dict)  # code, reason, message
    updated: float = 0.0


class StatusFile:
    def __init__(self, folder: Path) -> None:
        self.path = folder / "status.json"
        self.lock = threading.Lock()

    def write(self, status: Status) -> None:
        with self.lock:
            status.updated = time.time()
            tmp = self.path.with_name(f".status.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(status.__dict__))
            os.replace(tmp, self.path)


def read_status(folder: Path) -> Status | None:
    try:
        return Status(**json.loads((folder / "status.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _count_rows(files: list[str], fs: Any, fmt: str) -> int:
    import pyarrow.parquet as pq

    total = 0
    for path in files:
        with fs.open(path, "rb") as handle:
            if fmt == "parquet":
                total += pq.ParquetFile(handle).metadata.num_rows
            else:
                total += sum(1 for line in handle if line.strip())
    return total


def _columns_to_read(plan: JobPlan) -> list[str]:
    made: set[str] = set()
    needed = [plan.id_column, *plan.keep_columns]
    for stage in plan.stages:
        if stage.input_column not in made:
            needed.append(stage.input_column)
        made.update(stage.written_columns())
    return list(dict.fromkeys(needed))


def build_dataset(config: DriverConfig, written: set[Any], total: int) -> Any:
    import ray.data

    from mlmesh_batch import stages
    from mlmesh_batch.source import InputSource

    plan = config.plan
    location = storage.resolve(
        plan.input_uri, map(Path, config.allowed_roots), config.allowed_protocols
    )
    files = storage.input_files(location, _suffixes(plan.input_format))
    # Blocks of a few model batches: the first reaches an actor at once, and
    # every actor of the pool gets work.
    first_batch = next((s.batch_size for s in plan.stages if s.kind == "model"), 64)
    actors = max((s.concurrency for s in plan.stages if s.kind == "model"), default=1)
    block = max(first_batch * 4, min(4096, total // max(actors * 8, 1)))
    source = InputSource(
        files,
        location.fs,
        plan.input_format,
        _columns_to_read(plan),
        plan.id_column,
        block,
        frozenset(written),
    )
    # One output block stream per read task: Ray would otherwise split the
    # blocks to reach its default parallelism (200 blocks of 20 rows).
    ds = ray.data.read_datasource(source, num_cpus=LIGHT, override_num_blocks=source.task_count())
    cores = max(config.cores, 1)
    for stage in plan.stages:
        if stage.kind == "callable":
            ds = ds.map_batches(
                stages.run_callable,
                fn_kwargs={"stage": stage},
                batch_format="pyarrow",
                batch_size=None,
                num_cpus=LIGHT,
            )
        elif stage.execution == IN_PROCESS:
            # Each actor's torch threads: its share of the cores.
            threads = stage.num_cpus or max(cores // max(stage.concurrency, 1), 1)
            ds = ds.map_batches(
                stages.ModelStage,
                fn_constructor_kwargs={
                    "stage": stage,
                    "registry_target": config.registry_target,
                    "cache_root": config.cache_root,
                    "service_key_file": config.service_key_file,
                    "threads": int(max(threads, 1)),
                },
                batch_format="pyarrow",
                batch_size=stage.batch_size * 4,
                concurrency=stage.concurrency,
                # What the actors reserve: the rest of the pipeline is light
                # (reads, callables, the driver's writes) and shares them.
                num_cpus=float(threads),
                num_gpus=stage.num_gpus or None,
                max_restarts=-1,
                max_task_retries=-1,
            )
        else:
            assert stage.execution == ONLINE
            ds = ds.map_batches(
                stages.OnlineStage,
                fn_constructor_kwargs={
                    "stage": stage,
                    "gateway_target": config.gateway_target,
                    "api_key": os.environ.get(CALLER_KEY_ENV, ""),
                },
                batch_format="pyarrow",
                batch_size=stage.batch_size,
                concurrency=stage.concurrency,
                num_cpus=0.1,
                max_restarts=-1,
                max_task_retries=-1,
            )
    return ds


def _suffixes(fmt: str) -> tuple[str, ...]:
    return (".parquet",) if fmt == "parquet" else (".jsonl", ".json")


class Committer:
    """Turns result tables into committed parts and keeps the figures."""

    def __init__(
        self,
        config: DriverConfig,
        status: Status,
        written: set[Any],
        last_part: int,
        started: float,
    ) -> None:
        plan = config.plan
        roots, protocols = map(Path, config.allowed_roots), config.allowed_protocols
        self.output = storage.resolve(plan.output_uri, roots, protocols)
        self.errors = storage.resolve(plan.error_uri, map(Path, config.allowed_roots), protocols)
        self.plan = plan
        self.status = status
        self.seen = written  # ids written: a repeat (a retried batch) is dropped
        self.next_part = last_part + 1
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.last_commit = time.monotonic()
        self.started = started  # the driver's start: first_part_seconds counts from it
        self.recent: deque[tuple[float, int]] = deque([(self.started, 0)], maxlen=64)
        self.stage_rows = {s.name: [0, 0, 0.0] for s in plan.stages}  # out, failed, busy
        self.processed_this_attempt = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.pending_rows += table.num_rows
        due = time.monotonic() - self.last_commit >= self.plan.part_seconds
        if self.pending_rows >= self.plan.part_rows or (due and self.pending_rows):
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending, promote_options="permissive")
        self.pending, self.pending_rows = [], 0
        ids = table.column(self.plan.id_column).to_pylist()
        fresh = []
        for i, row_id in enumerate(ids):
            if row_id is None or row_id not in self.seen:
                fresh.append(i)
                if row_id is not None:
                    self.seen.add(row_id)
        if len(fresh) < len(ids):
            log.info("dropped %d rows written before (a retried batch)", len(ids) - len(fresh))
            table = table.take(pa.array(fresh, pa.int64()))
        if table.num_rows == 0:
            return
        failed_mask = pc.is_valid(table.column(ERROR_STAGE))
        failed = table.filter(failed_mask)
        good = table.filter(pc.invert(failed_mask))
        number = self.next_part
        if failed.num_rows:
            storage.write_errors(self.errors, number, self._error_rows(failed))
        if good.num_rows:
            storage.write_part(self.output, number, self._output_table(good))
        self.next_part += 1
        self._count(table, failed)
        self.status.parts.append([number, table.num_rows])
        self.status.part_count += 1
        if not self.status.first_part_seconds:
            self.status.first_part_seconds = round(time.monotonic() - self.started, 3)
        self.last_commit = time.monotonic()
        if self.plan.max_failed_rows and self.status.rows_failed > self.plan.max_failed_rows:
            raise TooManyFailures(
                f"{self.status.rows_failed} rows failed, more than max_failed_rows "
                f"({self.plan.max_failed_rows})"
            )

    def _count(self, table: pa.Table, failed: pa.Table) -> None:
        status = self.status
        status.rows_done += table.num_rows - failed.num_rows
        status.rows_failed += failed.num_rows
        self.processed_this_attempt += table.num_rows
        failed_in = failed.column(ERROR_STAGE).to_pylist()
        names = [s.name for s in self.plan.stages]
        for position, name in enumerate(names):
            counts = self.stage_rows[name]
            up_to_here = set(names[: position + 1]) | {"read"}
            counts[0] += table.num_rows - sum(1 for s in failed_in if s in up_to_here)
            counts[1] += sum(1 for s in failed_in if s == name)
            busy = f"{BUSY_PREFIX}{name}"
            if busy in table.column_names:
                counts[2] += float(pc.sum(table.column(busy)).as_py() or 0.0)
        now = time.monotonic()
        self.recent.append((now, self.processed_this_attempt))
        self.refresh_rate()

    def refresh_rate(self) -> None:
        status = self.status
        now = time.monotonic()
        window = [(t, n) for t, n in self.recent if now - t <= 10.0] or [self.recent[-1]]
        t0, n0 = window[0]
        if len(window) == 1:
            t0, n0 = self.recent[0]
        rate = (self.processed_this_attempt - n0) / max(now - t0, 1e-3)
        status.rows_per_second = round(rate, 2)
        left = status.rows_total - status.rows_done - status.rows_failed
        status.eta_seconds = round(left / rate, 1) if rate > 0 and left > 0 else 0.0
        status.stages = [
            {
                "name": s.name,
                "rows_out": self.stage_rows[s.name][0],
                "rows_failed": self.stage_rows[s.name][1],
                "busy_seconds": round(self.stage_rows[s.name][2], 3),
                "model_version": s.model_version,
            }
            for s in self.plan.stages
        ]

    def _output_table(self, good: pa.Table) -> pa.Table:
        columns = [c for c in self.plan.output_columns() if c in good.column_names]
        return good.select(columns)

    def _error_rows(self, failed: pa.Table) -> list[dict[str, Any]]:
        ids = failed.column(self.plan.id_column).to_pylist()
        stages = failed.column(ERROR_STAGE).to_pylist()
        reasons = failed.column(ERROR_REASON).to_pylist()
        messages = failed.column(ERROR_MESSAGE).to_pylist()
        inputs = failed.column(INPUT_ROW).to_pylist()
        out = []
        for row_id, stage, reason, message, row in zip(
            ids, stages, reasons, messages, inputs, strict=True
        ):
            record = {"id": row_id, "stage": stage, "reason": reason, "message": message}
            record["row"] = json.loads(row) if row else None
            if row_id is None and isinstance(record["row"], dict) and "line" in record["row"]:
                record["line"] = record["row"]["line"]  # a line that did not parse
            out.append(record)
        return out


def run(config: DriverConfig, folder: Path) -> Status:
    """Runs the job to its end; returns the final status (also written)."""
    import ray

    started = time.monotonic()
    plan = config.plan
    status = Status(attempt=config.attempt, pid=os.getpid())
    status_file = StatusFile(folder)
    status_file.write(status)
    roots, protocols = [Path(r) for r in config.allowed_roots], config.allowed_protocols
    output = storage.resolve(plan.output_uri, roots, protocols)
    errors = storage.resolve(plan.error_uri, roots, protocols)
    written, last_part = storage.written_ids(output, errors, plan.id_column)
    location = storage.resolve(plan.input_uri, roots, protocols)
    files = storage.input_files(location, _suffixes(plan.input_format))
    status.rows_total = _count_rows(files, location.fs, plan.input_format)
    status.rows_skipped = len(written)
    # What earlier attempts (or the resumed job) wrote counts as done.
    for number, path in storage.committed(output, "parquet").items():
        del number
        with output.fs.open(path, "rb") as handle:
            import pyarrow.parquet as pq

            status.rows_done += pq.ParquetFile(handle).metadata.num_rows
    status.rows_failed = len(written) - status.rows_done
    status.part_count = last_part
    status.state = "running"
    status_file.write(status)

    ray.init(
        # "local", never None: None would join whatever Ray this machine
        # last started.
        address=config.ray_address or "local",
        # A local Ray gets two scheduling slots more than the cores: model
        # actors reserve the cores, and Ray Data's file listing (one whole
        # CPU, not settable) and the light steps must still be placed, or
        # the pipeline deadlocks waiting for a CPU the actors hold.
        num_cpus=None if config.ray_address else config.cores + 2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=False,
    )
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = False
    # Ray Data bundles blocks under 1 MiB into one input and buffers a map
    # task's output up to 128 MiB: a model actor would then take the whole
    # input as one call and hand back one block at its end. Small targets
    # keep the stream flowing: every model batch goes on to the driver as
    # it is done, so parts (and progress) come as the rows do.
    context.target_min_block_size = 1
    context.target_max_block_size = 256 * 1024
    committer = Committer(config, status, written, last_part, started)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(1.0):
            committer.refresh_rate()
            status_file.write(status)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        dataset = build_dataset(config, written, status.rows_total)
        for table in dataset.iter_batches(
            batch_size=None, batch_format="pyarrow", prefetch_batches=4
        ):
            committer.add(table)
            status_file.write(status)
        committer.commit()
        committer.refresh_rate()
        status.eta_seconds = 0.0
        status.state = "succeeded"
    except Cancelled:
        committer.pending = []  # not committed: a resumed job redoes them
        status.state = "cancelled"
        status.error = {
            "code": "CANCELLED",
            "reason": "OPERATION_CANCELLED",
            "message": "cancelled by CancelJob",
        }
    except TooManyFailures as error:
        status.state = "failed"
        status.error = {"code": "ABORTED", "reason": "INPUT_INVALID", "message": str(error)}
    except Exception as error:  # the job fails, clearly; the parts written stay
        log.exception("job %s failed", plan.job_id)
        status.state = "failed"
        status.error = {
            "code": "INTERNAL",
            "reason": "INTERNAL",
            "message": f"{type(error).__name__}: {str(error)[:500]}",
        }
    finally:
        stop.set()
    status_file.write(status)
    return status


def main() -> None:
    folder = Path(sys.argv[1])
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )

    def cancel(signum: int, frame: Any) -> None:
        del signum, frame
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Cancelled()

    signal.signal(signal.SIGTERM, cancel)
    config = DriverConfig.from_json((folder / "driver.json").read_text())
    status = run(config, folder)
    log.info("job %s: %s", config.plan.job_id, status.state)
    # Ray's shutdown can take seconds (and hang on a dead cluster): the
    # status is written, the local Ray goes with this process's session.
    sys.stdout.flush()
    sys.stderr.flush()
    # The service reads the end state from status.json; the exit code says
    # the same to whoever else runs a driver (a KubeRay RayJob).
    os._exit(0 if status.state == "succeeded" else 1)


if __name__ == "__main__":
    main()

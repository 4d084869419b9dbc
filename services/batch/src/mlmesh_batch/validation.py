"""CreateJob's checks: a job is refused before anything is written unless
its input can be read with the columns its stages need, its models resolve,
its callables exist with good parameters, and its output is empty.

The contract's field rules (patterns, lengths, enums) are checked before
this by the chassis (protovalidate); these are the checks that need the
input, the registry or the service's settings. File work runs on a worker
thread, bounded in time; a URI is never echoed beyond a short prefix.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pyarrow.parquet as pq
from google.protobuf import json_format
from mlmesh.batch.v1 import batch_pb2 as pb
from mlmesh.common.v1 import errors_pb2
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh_chassis.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from mlmesh_sdk.reference import format_reference

from mlmesh_batch import callables, storage
from mlmesh_batch.plan import (
    CLASSIFY,
    EMBED,
    GENERATE,
    IN_PROCESS,
    ONLINE,
    RESERVED_PREFIX,
    JobPlan,
    StagePlan,
)

CHECK_TIMEOUT_S = 20.0
MAX_INPUT_FILES = 10_000
MAX_SCHEMA_LINE = 1 << 20  # bytes of a JSON line read to learn the columns
DEFAULT_BATCH = {IN_PROCESS: 64, ONLINE: 32}
DEFAULT_CONCURRENCY = {IN_PROCESS: 2, ONLINE: 4}
TASKS = {pb.TASK_EMBED: EMBED, pb.TASK_CLASSIFY: CLASSIFY, pb.TASK_GENERATE: GENERATE}
FORMATS = {pb.DATA_FORMAT_PARQUET: "parquet", pb.DATA_FORMAT_JSONL: "jsonl"}


class InputInvalid(InvalidArgument):
    """The input cannot be used (reason INPUT_INVALID, with the field)."""

    def __init__(self, field: str, description: str, **metadata: object) -> None:
        super().__init__(
            f"{field}: {description}", [FieldViolation(field, description)], field=field, **metadata
        )
        self.reason = errors_pb2.ERROR_REASON_INPUT_INVALID


@dataclass(frozen=True)
class Limits:
    allowed_roots: list[Path]
    allowed_protocols: list[str]
    gateway_configured: bool
    part_rows: int
    part_seconds: float


def _resolve(uri: str, field: str, limits: Limits) -> storage.Location:
    try:
        return storage.resolve(uri, limits.allowed_roots, limits.allowed_protocols)
    except storage.UriRefused as error:
        raise InvalidArgument.field(field, f"{storage.echo(uri)!r} {error}") from None


def read_columns(location: storage.Location, fmt: str) -> list[str]:
    """The input's columns (every file's, for parquet). Raises InputInvalid."""
    suffixes = (".parquet",) if fmt == "parquet" else (".jsonl", ".json")
    try:
        files = storage.input_files(location, suffixes)
    except (FileNotFoundError, OSError):
        raise InputInvalid(
            "job.input_uri", "no such file, or a folder without input files"
        ) from None
    if len(files) > MAX_INPUT_FILES:
        raise InputInvalid("job.input_uri", f"more than {MAX_INPUT_FILES} files")
    columns: list[str] | None = None
    for path in files if fmt == "parquet" else files[:1]:
        try:
            with location.fs.open(path, "rb") as handle:
                if fmt == "parquet":
                    names = list(pq.read_schema(handle).names)
                else:
                    names = _json_columns(handle.readline(MAX_SCHEMA_LINE))
        except (OSError, ValueError) as error:
            name = Path(path).name[:60]
            raise InputInvalid(
                "job.input_uri", f"{name!r} is not readable {fmt}: {str(error)[:120]}"
            ) from None
        if columns is not None and names != columns:
            raise InputInvalid("job.input_uri", "its files do not all have the same columns")
        columns = names
    return columns or []


def _json_columns(line: bytes) -> list[str]:
    if not line.strip():
        raise ValueError("the first line is empty")
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError("the first line is not a JSON object")
    return [str(k) for k in row]


def _model_stage(
    index: int, stage: pb.Stage, limits: Limits, violations: list[FieldViolation]
) -> StagePlan:
    body = stage.model
    path = f"job.stages[{index}].model"
    task = TASKS[body.task]
    execution = {
        pb.EXECUTION_IN_PROCESS: IN_PROCESS,
        pb.EXECUTION_ONLINE: ONLINE,
    }.get(body.execution, ONLINE if task == GENERATE else IN_PROCESS)
    if task == GENERATE and execution != ONLINE:
        violations.append(
            FieldViolation(
                f"{path}.execution", "GENERATE runs on the llm service: EXECUTION_ONLINE"
            )
        )
    if task == CLASSIFY and execution == ONLINE:
        violations.append(FieldViolation(f"{path}.execution", "CLASSIFY runs IN_PROCESS only"))
    if execution == ONLINE and not limits.gateway_configured:
        violations.append(
            FieldViolation(f"{path}.execution", "this service has no gateway for online stages")
        )
    params = json_format.MessageToDict(body.parameters) if body.HasField("parameters") else {}
    allowed = {"max_tokens", "temperature"} if task == GENERATE else set()
    for key, value in params.items():
        if key not in allowed:
            violations.append(
                FieldViolation(f"{path}.parameters.{key[:40]}", "not a parameter of this task")
            )
        elif key == "max_tokens" and not (isinstance(value, int | float) and 1 <= value <= 4096):
            violations.append(FieldViolation(f"{path}.parameters.max_tokens", "must be 1 to 4096"))
        elif key == "temperature" and not (isinstance(value, int | float) and 0 <= value <= 2):
            violations.append(FieldViolation(f"{path}.parameters.temperature", "must be 0 to 2"))
    return StagePlan(
        name=stage.name,
        kind="model",
        input_column=body.input_column,
        output_column=body.output_column or stage.name,
        parameters=params,
        model=body.model.model,
        task=task,
        execution=execution,
        batch_size=body.batch_size or DEFAULT_BATCH[execution],
        concurrency=body.concurrency or DEFAULT_CONCURRENCY[execution],
        num_cpus=body.num_cpus,
        num_gpus=body.num_gpus,
    )


def _callable_stage(index: int, stage: pb.Stage, violations: list[FieldViolation]) -> StagePlan:
    body = stage.callable
    path = f"job.stages[{index}].callable"
    if body.function not in callables.REGISTERED:
        raise NotFound(
            "callable",
            body.function,
            f"{path}.function: no callable {body.function!r} (ListCallables names them)",
        )
    raw = json_format.MessageToDict(body.parameters) if body.HasField("parameters") else {}
    try:
        params = callables.check_parameters(body.function, raw)
    except callables.ParameterError as error:
        violations.append(FieldViolation(f"{path}.parameters.{error.field}", error.description))
        params = {}
    return StagePlan(
        name=stage.name,
        kind="callable",
        input_column=body.input_column,
        output_column=body.output_column or stage.name,
        parameters=params,
        function=body.function,
    )


def check_shape(job: pb.Job, limits: Limits) -> list[StagePlan]:
    """The stages as planned (versions not yet resolved); raises
    INVALID_ARGUMENT (every violation) or NOT_FOUND (a callable)."""
    violations: list[FieldViolation] = []
    stages: list[StagePlan] = []
    names: set[str] = set()
    for index, stage in enumerate(job.stages):
        if stage.name in names:
            violations.append(
                FieldViolation(f"job.stages[{index}].name", "used by an earlier stage")
            )
        names.add(stage.name)
        planned = (
            _model_stage(index, stage, limits, violations)
            if stage.WhichOneof("body") == "model"
            else _callable_stage(index, stage, violations)
        )
        for column in planned.written_columns():
            if column.startswith(RESERVED_PREFIX):
                violations.append(
                    FieldViolation(
                        f"job.stages[{index}]", f"output column {column!r}: '_' names are reserved"
                    )
                )
        stages.append(planned)
    for index, column in enumerate(job.keep_columns):
        if column.startswith(RESERVED_PREFIX):
            violations.append(
                FieldViolation(f"job.keep_columns[{index}]", "'_' names are reserved")
            )
    if violations:
        raise InvalidArgument.listing(violations, 3)
    return stages


def check_columns(job: pb.Job, stages: list[StagePlan], columns: list[str]) -> None:
    """Every column a stage reads exists by then; raises InputInvalid."""
    available = set(columns)
    if job.id_column not in available:
        raise InputInvalid(
            "job.id_column", f"the input has no column {job.id_column!r}", column=job.id_column
        )
    for index, column in enumerate(job.keep_columns):
        if column not in available:
            raise InputInvalid(
                f"job.keep_columns[{index}]", f"the input has no column {column!r}", column=column
            )
    for index, stage in enumerate(stages):
        if stage.input_column not in available:
            raise InputInvalid(
                f"job.stages[{index}].input_column",
                f"no column {stage.input_column!r} in the input or from an earlier stage",
                column=stage.input_column,
            )
        available.update(stage.written_columns())


async def resolve_versions(
    stages: list[StagePlan], job: pb.Job, resolve: Callable[[ModelReference], Any]
) -> list[StagePlan]:
    """Pins each model stage's reference to a version (NOT_FOUND for an
    unknown model, version or alias)."""
    pinned = []
    for index, (stage, message) in enumerate(zip(stages, job.stages, strict=True)):
        if stage.kind != "model":
            pinned.append(stage)
            continue
        reference = message.model.model
        try:
            version = await resolve(reference)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.NOT_FOUND:
                text = format_reference(reference)
                raise NotFound(
                    "model",
                    text,
                    f"job.stages[{index}].model.model: {text!r} is not in the registry",
                ) from None
            raise Unavailable(f"the registry cannot be reached ({code.name})", 2.0) from None
        pinned.append(StagePlan(**{**stage.__dict__, "version": int(version.version)}))
    return pinned


async def plan_job(
    job_id: str,
    job: pb.Job,
    limits: Limits,
    resolve: Callable[[ModelReference], Any],
    resuming: bool = False,
) -> JobPlan:
    """The job's plan, or the error that refuses it (nothing written)."""
    stages = check_shape(job, limits)
    fmt = FORMATS[job.input_format]

    def check_files() -> tuple[storage.Location, storage.Location, storage.Location]:
        """Resolves the URIs and reads the input's columns (disk or network
        work: on a worker thread)."""
        input_location = _resolve(job.input_uri, "job.input_uri", limits)
        output = _resolve(job.output_uri, "job.output_uri", limits)
        error_uri = job.error_uri or output.join("_errors").uri
        errors = _resolve(error_uri, "job.error_uri", limits)
        inside = input_location.path.startswith(output.path.rstrip("/") + "/")
        if output.path.rstrip("/") == input_location.path.rstrip("/") or inside:
            raise InvalidArgument.field("job.output_uri", "must not be the input or hold it")
        columns = read_columns(input_location, fmt)
        check_columns(job, stages, columns)
        if not resuming and not storage.is_empty(output):
            raise InvalidArgument.field(
                "job.output_uri", "is not empty (resume a job to add to it)"
            )
        default_errors = errors.path == output.join("_errors").path
        if not resuming and not default_errors and not storage.is_empty(errors):
            raise InvalidArgument.field("job.error_uri", "is not empty")
        return input_location, output, errors

    try:
        input_location, output, errors = await asyncio.wait_for(
            asyncio.to_thread(check_files), CHECK_TIMEOUT_S
        )
    except TimeoutError:
        raise Unavailable("the input could not be checked in time", 5.0) from None
    pinned = await resolve_versions(stages, job, resolve)
    return JobPlan(
        job_id=job_id,
        input_uri=input_location.uri,
        input_format=fmt,
        id_column=job.id_column,
        keep_columns=list(job.keep_columns),
        stages=pinned,
        output_uri=output.uri,
        error_uri=errors.uri,
        max_failed_rows=job.max_failed_rows,
        part_rows=limits.part_rows,
        part_seconds=limits.part_seconds,
    )

"""`mlmesh batch` commands: batch inference jobs (mlmesh.batch.v1).

    mlmesh batch embed --input data/sentences.parquet --output out/emb [--model minilm@champion]
    mlmesh batch submit --job job.json [--no-wait]
    mlmesh batch watch jobs/abc | get jobs/abc | cancel jobs/abc | resume jobs/abc
    mlmesh batch list [--state running] | callables

`embed` and `submit` create a job, then follow it (WatchJob) to its final
state, drawing one line on stderr that is redrawn in place (``render_job``):

    batch jobs/abc  [##########..........]   52%  1040/2000 rows  3 failed  251 rows/s  4 s left

then print the job's summary on stdout: its state, counts, each stage's
figures and where the output and the failed rows are. They exit 0 when the
job SUCCEEDED (with or without failed rows), else 1 with the job's error.
Ctrl-C stops watching, never the job: it prints the `cancel` command and
exits 130. ``--no-wait`` prints the job's name and returns at once.

A path without a scheme (``out/emb``) is sent as an absolute local path: the
service reads and writes ``file://`` only under its allowed roots, and only
absolute paths, so this is for a service on this machine (``make run``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import code_pb2
from mlmesh.batch.v1 import batch_pb2 as pb
from mlmesh.batch.v1 import batch_service_pb2 as rpc
from mlmesh.batch.v1 import batch_service_pb2_grpc
from mlmesh.common.v1.model_reference_pb2 import ModelReference

from mlmesh_sdk.channel import mesh_channel
from mlmesh_sdk.pages import every_item
from mlmesh_sdk.progress import LiveLine, bar, duration
from mlmesh_sdk.reference import format_reference, parse_reference

Subcommands = Any  # argparse's _SubParsersAction is private
Stub = batch_service_pb2_grpc.BatchServiceStub
FINAL = frozenset(
    {
        pb.JOB_STATE_SUCCEEDED,
        pb.JOB_STATE_SUCCEEDED_WITH_ERRORS,
        pb.JOB_STATE_FAILED,
        pb.JOB_STATE_CANCELLED,
    }
)
SUCCEEDED = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_SUCCEEDED_WITH_ERRORS})
STATES = [
    value.name.removeprefix("JOB_STATE_").lower()
    for value in pb.JobState.DESCRIPTOR.values
    if value.number
]
FORMATS = {"parquet": pb.DATA_FORMAT_PARQUET, "jsonl": pb.DATA_FORMAT_JSONL}
JOB_NAME = re.compile(r"jobs/[a-z0-9]{1,32}")
EMBED_STAGE = "embedding"  # also the output column: `embedding`, `embedding_model`
# CreateJob reads the input's schema and resolves the models before it
# answers (each check bounded at 20 s by the service).
CREATE_TIMEOUT_S = 60.0
REDRAW_S = 0.25
# A watch dropped this many times in a row (the service restarting) gives up.
WATCH_RETRIES = 5
RETRY_BACKOFF_S = 1.0  # doubled each time, at most 10 s


class JobNotSucceeded(ValueError):
    """A followed job ended FAILED or CANCELLED. A ValueError, so the command
    line prints it as `error: ...` and exits 1, after the job's summary."""


# argument types


def _job_name(text: str) -> str:
    """`jobs/abc`, or `abc` for short."""
    name = text if text.startswith("jobs/") else f"jobs/{text}"
    if not JOB_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected jobs/ID (lowercase letters, digits): {text!r}")
    return name


def _model(text: str) -> ModelReference:
    try:
        return parse_reference(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _uri(text: str) -> str:
    """A URI as given; a path without a scheme made absolute. Sent without
    ``file://`` so that no character needs quoting (the service takes a bare
    absolute path as a local file)."""
    return text if "://" in text else os.path.abspath(text)


def _input_format(uri: str, named: str | None) -> pb.DataFormat:
    if named:
        return FORMATS[named]
    return (
        pb.DATA_FORMAT_JSONL
        if uri.lower().endswith((".jsonl", ".json"))
        else pb.DATA_FORMAT_PARQUET
    )


# requests (pure: what the commands send)


def embed_request(args: argparse.Namespace) -> rpc.CreateJobRequest:
    """`batch embed`'s job: one EMBED stage over ``--column``."""
    input_uri = _uri(args.input)
    job = pb.Job(
        display_name=f"embed {os.path.basename(input_uri.rstrip('/'))} with "
        f"{format_reference(args.model)}"[:100],
        input_uri=input_uri,
        input_format=_input_format(input_uri, args.format),
        id_column=args.id_column,
        keep_columns=[c for item in args.keep for c in item.split(",") if c],
        stages=[
            pb.Stage(
                name=EMBED_STAGE,
                model=pb.ModelStage(
                    model=args.model,
                    task=pb.TASK_EMBED,
                    input_column=args.column,
                    batch_size=args.batch_size,
                    concurrency=args.concurrency,
                ),
            )
        ],
        output_uri=_uri(args.output),
        max_failed_rows=args.max_failed_rows,
    )
    return rpc.CreateJobRequest(job=job, request_id=args.request_id)


def submit_request(args: argparse.Namespace) -> rpc.CreateJobRequest:
    """`batch submit`'s job: a Job in the proto3 JSON mapping, as written."""
    path = Path(args.job)
    try:
        job = json_format.Parse(path.read_text(), pb.Job())
    except json_format.ParseError as error:
        raise ValueError(f"{path}: not a mlmesh.batch.v1.Job: {error}") from None
    return rpc.CreateJobRequest(job=job, request_id=args.request_id)


def resume_request(name: str, request_id: str = "") -> rpc.CreateJobRequest:
    """A job resuming ``name``: the service takes its input, stages, pinned
    versions and output from the old job, so no job is sent."""
    return rpc.CreateJobRequest(resume_from=name, request_id=request_id)


# the progress line and the summaries (pure: job -> text)


def _state(state: int) -> str:
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def _rate(rows_per_second: float) -> str:
    return f"{rows_per_second:.0f}" if rows_per_second >= 10 else f"{rows_per_second:.1f}"


def _elapsed(job: pb.Job) -> float | None:
    if not (job.HasField("start_time") and job.HasField("end_time")):
        return None
    return (job.end_time.ToDatetime() - job.start_time.ToDatetime()).total_seconds()


def render_job(job: pb.Job) -> str:
    """The progress line (without ``\\r``) for a job snapshot: the share of
    rows processed (written or failed) of the input's rows, the failed rows,
    and while it runs, the rate and the time left the service reports."""
    label = f"batch {job.name}"
    progress = job.progress
    processed = progress.rows_done + progress.rows_failed
    total = progress.rows_total
    if job.state == pb.JOB_STATE_QUEUED:
        return f"{label}  queued"
    if job.state == pb.JOB_STATE_RUNNING and not total and not processed:
        return f"{label}  starting"  # the driver counts the input's rows first
    parts = [label]
    if total > 0:
        fraction = min(processed / total, 1.0)
        parts += [bar(fraction), f"{fraction:4.0%}", f"{processed}/{total} rows"]
    else:
        parts.append(f"{processed} rows")
    if progress.rows_failed:
        parts.append(f"{progress.rows_failed} failed")
    if job.state == pb.JOB_STATE_RUNNING:
        if progress.rows_per_second > 0:
            parts.append(f"{_rate(progress.rows_per_second)} rows/s")
        if progress.eta_seconds > 0:
            parts.append(f"{duration(progress.eta_seconds)} left")
    else:
        parts.append(_state(job.state))
        elapsed = _elapsed(job)
        if job.state in FINAL and elapsed is not None:
            parts.append(f"in {duration(elapsed)}")
    if job.attempts > 1:
        parts.append(f"attempt {job.attempts}")
    return "  ".join(parts)


def errors_uri(job: pb.Job) -> str:
    """Where the job's failed rows are (the contract's default: `<output>/_errors`)."""
    return job.error_uri or f"{job.output_uri.rstrip('/')}/_errors"


def job_line(job: pb.Job) -> str:
    """One line for a job in a list."""
    progress = job.progress
    rows = f"{progress.rows_done + progress.rows_failed}"
    if progress.rows_total:
        rows += f"/{progress.rows_total}"
    parts = [job.name, _state(job.state), f"{rows} rows"]
    if progress.rows_failed:
        parts.append(f"{progress.rows_failed} failed")
    if job.display_name:
        parts.append(repr(job.display_name))
    if job.HasField("create_time"):
        parts.append(f"created {job.create_time.ToDatetime():%Y-%m-%d %H:%M:%S}")
    return "  ".join(parts)


def job_summary(job: pb.Job) -> str:
    """A job's outcome: state and counts, a line per stage, the output and
    errors locations, and the error of a FAILED or CANCELLED job."""
    progress = job.progress
    head = [job.name, _state(job.state), f"{progress.rows_done} rows written"]
    if progress.rows_total:
        head[-1] = f"{progress.rows_done} of {progress.rows_total} rows written"
    head += [f"{progress.rows_failed} failed", f"{progress.parts} parts"]
    elapsed = _elapsed(job)
    if elapsed is not None:
        head.append(f"in {duration(elapsed)}")
    if job.attempts > 1:
        head.append(f"{job.attempts} attempts")
    lines = ["  ".join(head)]
    if job.resumed_from:
        lines.append(
            f"  resumed from {job.resumed_from}: {progress.rows_skipped} rows already written"
        )
    for stage in progress.stages:
        figures = [
            f"  stage {stage.name}",
            f"{stage.rows_out} rows out",
            f"{stage.rows_failed} failed",
            f"busy {stage.busy_seconds:.1f} s",
        ]
        if stage.model_version:
            figures.append(stage.model_version)
        lines.append("  ".join(figures))
    lines.append(f"  output  {job.output_uri}")
    lines.append(f"  errors  {errors_uri(job)}")
    if job.HasField("error") and job.error.message:
        lines.append(f"  error   {code_pb2.Code.Name(job.error.code)}: {job.error.message}")
    return "\n".join(lines)


def summary(message: Message) -> str | None:
    """One human line (or block) for the batch replies (None: not one of them)."""
    if isinstance(message, rpc.GetJobResponse | rpc.WatchJobResponse):
        return job_summary(message.job)
    if isinstance(message, pb.Job):
        return job_line(message)
    if isinstance(message, rpc.CancelJobResponse):
        return job_line(message.job)
    if isinstance(message, rpc.Operation):
        return message.name  # what `watch`, `get` and `cancel` take
    if isinstance(message, rpc.ListCallablesResponse):
        return "\n".join(f"{c.name}  {c.description}" for c in message.callables)
    return None


# following a job


@contextlib.asynccontextmanager
async def _batch(args: argparse.Namespace) -> AsyncIterator[Stub]:
    async with mesh_channel(args.target, args.api_key or "") as channel:
        yield batch_service_pb2_grpc.BatchServiceStub(channel)


def _live_line(args: argparse.Namespace) -> LiveLine | None:
    """The progress line on stderr: when asked (--progress), else when stderr
    is a terminal and the output is not --json."""
    show = args.progress
    if show is None:
        show = not args.json and sys.stderr.isatty()
    return LiveLine(sys.stderr, interval_s=REDRAW_S) if show else None


async def final_job(stub: Stub, name: str, line: LiveLine | None) -> pb.Job:
    """Follows WatchJob to the job's final state, drawing each snapshot on
    ``line``. A stream that drops (UNAVAILABLE: the service restarting) or
    ends early is opened again, WATCH_RETRIES times in a row at most. Ctrl-C
    stops the watch only: the job goes on, and how to cancel it is printed."""
    job: pb.Job | None = None
    retries = 0
    try:
        while True:
            try:
                async for response in stub.WatchJob(rpc.WatchJobRequest(name=name)):
                    job = response.job
                    retries = 0
                    if line is not None:
                        line.draw(render_job(job), final=job.state in FINAL)
                if job is not None and job.state in FINAL:
                    return job
                if retries >= WATCH_RETRIES:
                    raise ValueError(f"the watch of {name} ended before the job did")
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or retries >= WATCH_RETRIES:
                    raise
            retries += 1
            await asyncio.sleep(min(RETRY_BACKOFF_S * 2 ** (retries - 1), 10.0))
    except (asyncio.CancelledError, KeyboardInterrupt):
        if line is not None:
            line.close()
        print(
            f"stopped watching; {name} goes on. Cancel it with: mlmesh batch cancel {name}",
            file=sys.stderr,
        )
        raise
    finally:
        if line is not None:
            line.close()


async def _follow(stub: Stub, name: str, args: argparse.Namespace) -> AsyncIterator[Message]:
    job = await final_job(stub, name, _live_line(args))
    yield rpc.WatchJobResponse(job=job)
    if job.state not in SUCCEEDED:
        reason = f": {job.error.message}" if job.error.message else ""
        raise JobNotSucceeded(f"{name} {_state(job.state)}{reason}")


async def _create(
    stub: Stub, request: rpc.CreateJobRequest, args: argparse.Namespace
) -> AsyncIterator[Message]:
    """CreateJob, then the operation's name (--no-wait) or the job followed."""
    response = await stub.CreateJob(request, timeout=max(args.timeout, CREATE_TIMEOUT_S))
    if args.no_wait:
        yield response.operation
        return
    async for message in _follow(stub, response.operation.name, args):
        yield message


# commands


def _submit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--request-id", default="", help="idempotency key: the same job sent again is not re-run"
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="print the job's name and return at once"
    )


def add_batch(commands: Subcommands) -> None:
    batch = commands.add_parser("batch", help="batch inference jobs").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )

    embed = batch.add_parser("embed", help="embed a column of a dataset with a model")
    embed.add_argument("--input", required=True, metavar="URI", help="a file or a folder of files")
    embed.add_argument("--output", required=True, metavar="URI", help="an empty or new folder")
    embed.add_argument(
        "--model",
        type=_model,
        default="minilm@champion",
        metavar="REF",
        help="default minilm@champion",
    )
    embed.add_argument("--column", default="text", help="the text column (default text)")
    embed.add_argument("--id-column", default="id", help="a unique row id (default id)")
    embed.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="COLUMN",
        help="input columns copied to the output (repeatable or a,b; the id always is)",
    )
    embed.add_argument(
        "--format",
        choices=sorted(FORMATS),
        help="the input's format (default: jsonl for a .jsonl/.json input, else parquet)",
    )
    embed.add_argument("--batch-size", type=int, default=0, help="rows per model call")
    embed.add_argument("--concurrency", type=int, default=0, help="model actors")
    embed.add_argument(
        "--max-failed-rows", type=int, default=0, help="fail the job past this (0: no limit)"
    )
    _submit_options(embed)

    async def run_embed(args: argparse.Namespace) -> AsyncIterator[Message]:
        request = embed_request(args)
        async with _batch(args) as stub:
            async for message in _create(stub, request, args):
                yield message

    embed.set_defaults(run=run_embed)

    submit = batch.add_parser("submit", help="submit a job written as JSON")
    submit.add_argument(
        "--job", required=True, metavar="FILE.json", help="a mlmesh.batch.v1.Job (proto3 JSON)"
    )
    _submit_options(submit)

    async def run_submit(args: argparse.Namespace) -> AsyncIterator[Message]:
        request = submit_request(args)
        async with _batch(args) as stub:
            async for message in _create(stub, request, args):
                yield message

    submit.set_defaults(run=run_submit)

    watch = batch.add_parser("watch", help="follow a job to its end")
    watch.add_argument("name", type=_job_name, metavar="NAME")

    async def run_watch(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _batch(args) as stub:
            async for message in _follow(stub, args.name, args):
                yield message

    watch.set_defaults(run=run_watch)

    get = batch.add_parser("get", help="a job's state, counts and output")
    get.add_argument("name", type=_job_name, metavar="NAME")

    async def run_get(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _batch(args) as stub:
            yield await stub.GetJob(rpc.GetJobRequest(name=args.name), timeout=args.timeout)

    get.set_defaults(run=run_get)

    ls = batch.add_parser("list", help="your jobs, newest first")
    ls.add_argument("--state", type=str.lower, choices=STATES, help="only jobs in this state")
    ls.add_argument("--page-size", type=int, default=0, help="jobs per call (all pages are read)")

    async def run_list(args: argparse.Namespace) -> AsyncIterator[Message]:
        request = rpc.ListJobsRequest(
            state=f"JOB_STATE_{args.state.upper()}" if args.state else pb.JOB_STATE_UNSPECIFIED,
            page_size=args.page_size,
        )
        async with _batch(args) as stub:
            pages = every_item(
                lambda page: stub.ListJobs(page, timeout=args.timeout), request, "jobs"
            )
            async for job in pages:
                yield job

    ls.set_defaults(run=run_list)

    cancel = batch.add_parser("cancel", help="stop a job (the parts written stay)")
    cancel.add_argument("name", type=_job_name, metavar="NAME")

    async def run_cancel(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _batch(args) as stub:
            yield await stub.CancelJob(rpc.CancelJobRequest(name=args.name), timeout=args.timeout)

    cancel.set_defaults(run=run_cancel)

    resume = batch.add_parser(
        "resume", help="a new job for a FAILED or CANCELLED one, skipping the rows it wrote"
    )
    resume.add_argument("name", type=_job_name, metavar="NAME")
    _submit_options(resume)

    async def run_resume(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _batch(args) as stub:
            async for message in _create(stub, resume_request(args.name, args.request_id), args):
                yield message

    resume.set_defaults(run=run_resume)

    callables = batch.add_parser("callables", help="the callables a stage may run")

    async def run_callables(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _batch(args) as stub:
            yield await stub.ListCallables(rpc.ListCallablesRequest(), timeout=args.timeout)

    callables.set_defaults(run=run_callables)

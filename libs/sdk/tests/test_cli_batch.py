"""`mlmesh batch`: the progress line and summaries drawn from a job, the
CreateJobRequest the arguments make (checked against the contract's rules),
and following a job to its exit status, against a stub in place of the
service (no Ray, no batch service here)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from mlmesh.batch.v1 import batch_pb2 as pb
from mlmesh.batch.v1 import batch_service_pb2 as rpc
from mlmesh_chassis.validation import violations_of
from mlmesh_sdk import cli, cli_batch
from mlmesh_sdk.progress import LiveLine


def _job(state: int = pb.JOB_STATE_RUNNING, **progress: Any) -> pb.Job:
    stages = progress.pop("stages", [])
    job = pb.Job(
        name="jobs/abc",
        state=state,
        output_uri="file:///data/out",
        progress=pb.JobProgress(stages=stages, **progress),
    )
    return job


def _timed(job: pb.Job, seconds: int) -> pb.Job:
    job.start_time.FromSeconds(1_700_000_000)
    job.end_time.FromSeconds(1_700_000_000 + seconds)
    return job


# the progress line


def test_a_running_job_shows_its_share_rows_failures_rate_and_time_left() -> None:
    job = _job(
        rows_total=2000, rows_done=1037, rows_failed=3, rows_per_second=251.4, eta_seconds=3.8
    )
    assert cli_batch.render_job(job) == (
        "batch jobs/abc  [##########..........]   52%  1040/2000 rows  3 failed  "
        "251 rows/s  4 s left"
    )
    slow = _job(rows_total=10_000, rows_done=100, rows_per_second=2.5, eta_seconds=3960)
    assert cli_batch.render_job(slow).endswith("1%  100/10000 rows  2.5 rows/s  1 h 06 min left")


def test_no_failures_no_rate_and_no_eta_are_left_out() -> None:
    line = cli_batch.render_job(_job(rows_total=2000, rows_done=500))
    assert line == "batch jobs/abc  [#####...............]   25%  500/2000 rows"


def test_zero_totals_neither_divide_nor_claim_progress() -> None:
    assert cli_batch.render_job(_job(pb.JOB_STATE_QUEUED)) == "batch jobs/abc  queued"
    assert cli_batch.render_job(_job()) == "batch jobs/abc  starting"
    # an empty input, or a job that failed before it counted the rows
    empty = _timed(_job(pb.JOB_STATE_SUCCEEDED), 2)
    assert cli_batch.render_job(empty) == "batch jobs/abc  0 rows  succeeded  in 2 s"
    failed = _job(pb.JOB_STATE_FAILED)
    assert cli_batch.render_job(failed) == "batch jobs/abc  0 rows  failed"


def test_a_final_job_shows_its_state_and_time_not_a_rate() -> None:
    job = _timed(
        _job(
            pb.JOB_STATE_SUCCEEDED_WITH_ERRORS,
            rows_total=2000,
            rows_done=1997,
            rows_failed=3,
            rows_per_second=300,
        ),
        125,
    )
    assert cli_batch.render_job(job) == (
        "batch jobs/abc  [####################]  100%  2000/2000 rows  3 failed  "
        "succeeded_with_errors  in 2 min 05 s"
    )
    job.attempts = 2
    assert cli_batch.render_job(job).endswith("in 2 min 05 s  attempt 2")


def test_the_share_never_passes_a_whole() -> None:
    # rows_total counted once; a restarted attempt may report more rows
    line = cli_batch.render_job(_job(rows_total=10, rows_done=12))
    assert "[####################]  100%  12/10 rows" in line


def test_the_live_line_redraws_at_most_every_interval_and_closes_on_a_new_line() -> None:
    stream, now = io.StringIO(), [0.0]
    line = LiveLine(stream, interval_s=0.25, clock=lambda: now[0])
    line.draw("a 1")
    now[0] = 0.1
    line.draw("a 2")  # too soon
    now[0] = 0.4
    line.draw("a 33")
    line.close()
    line.draw("a 4", final=True)  # a closed line draws nothing more
    assert stream.getvalue() == "\ra 1\ra 33\n"


# summaries


def test_the_summary_gives_state_counts_stages_and_where_the_rows_are() -> None:
    job = _timed(
        _job(
            pb.JOB_STATE_SUCCEEDED_WITH_ERRORS,
            rows_total=2000,
            rows_done=1997,
            rows_failed=3,
            parts=2,
            stages=[
                pb.StageProgress(
                    name="embedding",
                    rows_out=1997,
                    rows_failed=3,
                    busy_seconds=12.34,
                    model_version="minilm@4",
                )
            ],
        ),
        8,
    )
    assert cli.summary(rpc.WatchJobResponse(job=job)) == (
        "jobs/abc  succeeded_with_errors  1997 of 2000 rows written  3 failed  2 parts  in 8 s\n"
        "  stage embedding  1997 rows out  3 failed  busy 12.3 s  minilm@4\n"
        "  output  file:///data/out\n"
        "  errors  file:///data/out/_errors"
    )
    job.error_uri = "file:///data/errors"
    job.state = pb.JOB_STATE_FAILED
    job.error.CopyFrom(status_pb2.Status(code=9, message="4 rows failed, more than 3"))
    text = cli.summary(rpc.GetJobResponse(job=job))
    assert "  errors  file:///data/errors\n" in text
    assert text.endswith("  error   FAILED_PRECONDITION: 4 rows failed, more than 3")


def test_lists_print_a_line_per_job_and_operations_their_name() -> None:
    job = _job(rows_total=2000, rows_done=40, rows_failed=2)
    job.display_name = "embed sentences"
    job.create_time.FromSeconds(1_700_000_000)
    assert cli.summary(job) == (
        "jobs/abc  running  42/2000 rows  2 failed  'embed sentences'  created 2023-11-14 22:13:20"
    )
    assert cli.summary(rpc.CancelJobResponse(job=_job(pb.JOB_STATE_CANCELLING))) == (
        "jobs/abc  cancelling  0 rows"
    )
    assert cli.summary(rpc.Operation(name="jobs/abc", metadata=job)) == "jobs/abc"
    callables = rpc.ListCallablesResponse(
        callables=[rpc.Callable(name="text.normalize", description="collapses spaces")]
    )
    assert cli.summary(callables) == "text.normalize  collapses spaces"


# arguments -> requests


def _parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(["batch", *argv])


def test_embed_makes_one_embed_stage_job_that_the_contract_accepts(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = _parse("embed", "--input", "data/sentences.parquet", "--output", "file:///srv/out")
    request = cli_batch.embed_request(args)
    assert violations_of(request) == []
    job = request.job
    assert job.input_uri == str(tmp_path / "data" / "sentences.parquet")  # made absolute
    assert job.output_uri == "file:///srv/out"  # a URI is sent as given
    assert job.input_format == pb.DATA_FORMAT_PARQUET
    assert job.id_column == "id" and list(job.keep_columns) == []
    assert len(job.stages) == 1
    stage = job.stages[0]
    assert stage.name == "embedding"
    assert stage.model.task == pb.TASK_EMBED and stage.model.input_column == "text"
    assert stage.model.model.model == "minilm" and stage.model.model.alias == "champion"
    assert stage.model.batch_size == 0 and stage.model.concurrency == 0  # the service's defaults
    assert job.display_name == "embed sentences.parquet with minilm@champion"
    assert request.request_id == "" and args.no_wait is False


def test_embed_options_reach_the_request() -> None:
    args = _parse(
        "embed",
        "--input",
        "/data/in.jsonl",
        "--output",
        "/data/out",
        "--model",
        "minilm/3",
        "--column",
        "body",
        "--id-column",
        "doc_id",
        "--keep",
        "body,lang",
        "--keep",
        "title",
        "--batch-size",
        "128",
        "--concurrency",
        "3",
        "--max-failed-rows",
        "10",
        "--request-id",
        "demo-1",
        "--no-wait",
    )
    request = cli_batch.embed_request(args)
    assert violations_of(request) == []
    job = request.job
    assert job.input_format == pb.DATA_FORMAT_JSONL  # from the suffix
    assert job.id_column == "doc_id" and list(job.keep_columns) == ["body", "lang", "title"]
    model = job.stages[0].model
    assert model.model.version == 3 and model.input_column == "body"
    assert (model.batch_size, model.concurrency, job.max_failed_rows) == (128, 3, 10)
    assert request.request_id == "demo-1" and args.no_wait
    named = _parse("embed", "--input", "/d/in.jsonl", "--output", "/o", "--format", "parquet")
    assert cli_batch.embed_request(named).job.input_format == pb.DATA_FORMAT_PARQUET


def test_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["embed", "--input", "/i", "--output", "/o", "--model", "MiniLM"],
        ["embed", "--input", "/i", "--output", "/o", "--format", "csv"],
        ["embed", "--output", "/o"],
        ["get", "jobs/ABC"],
        ["list", "--state", "done"],
    ):
        with pytest.raises(SystemExit) as exit_:
            _parse(*argv)
        assert exit_.value.code == 2
    assert "model name 'MiniLM'" in capsys.readouterr().err


def test_a_job_name_may_be_given_short() -> None:
    assert _parse("get", "abc").name == "jobs/abc"
    assert _parse("cancel", "jobs/abc").name == "jobs/abc"
    args = _parse("list", "--state", "SUCCEEDED_WITH_ERRORS", "--page-size", "5")
    assert (args.state, args.page_size) == ("succeeded_with_errors", 5)


def test_submit_reads_a_job_in_json(tmp_path: Any) -> None:
    job = cli_batch.embed_request(_parse("embed", "--input", "/i.parquet", "--output", "/o")).job
    path = tmp_path / "job.json"
    path.write_text(json_format.MessageToJson(job))
    request = cli_batch.submit_request(_parse("submit", "--job", str(path), "--request-id", "r1"))
    assert request.job == job and request.request_id == "r1"
    path.write_text(json.dumps({"inputUri": "/i", "stages": [{"nmae": "x"}]}))
    with pytest.raises(ValueError, match=r"not a mlmesh\.batch\.v1\.Job"):
        cli_batch.submit_request(_parse("submit", "--job", str(path)))


def test_resume_sends_the_old_jobs_name_only() -> None:
    args = _parse("resume", "abc", "--request-id", "again")
    request = cli_batch.resume_request(args.name, args.request_id)
    assert violations_of(request) == []
    assert request.resume_from == "jobs/abc" and request.request_id == "again"
    assert not request.HasField("job")


# following a job


def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="restart"
    )


class FakeBatch:
    """The BatchService stub's calls the commands make, from scripts: each
    WatchJob call plays the next list (a Job is sent, an exception raised)."""

    def __init__(self, *watches: Iterable[Any]) -> None:
        self.watches = [list(w) for w in watches]
        self.created: list[rpc.CreateJobRequest] = []

    async def CreateJob(self, request: rpc.CreateJobRequest, **options: Any) -> Any:
        self.created.append(request)
        return rpc.CreateJobResponse(
            operation=rpc.Operation(name="jobs/abc", metadata=_job(pb.JOB_STATE_QUEUED))
        )

    def WatchJob(self, request: rpc.WatchJobRequest) -> AsyncIterator[rpc.WatchJobResponse]:
        assert request.name == "jobs/abc"
        script = self.watches.pop(0)

        async def play() -> AsyncIterator[rpc.WatchJobResponse]:
            for item in script:
                if isinstance(item, BaseException):
                    raise item
                if callable(item):
                    await item()
                    continue
                yield rpc.WatchJobResponse(job=item)

        return play()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> list[FakeBatch]:
    """Every command's stub is the FakeBatch put in this list."""
    stubs: list[FakeBatch] = []

    @contextlib.asynccontextmanager
    async def batch(args: Any) -> AsyncIterator[FakeBatch]:
        yield stubs[0]

    monkeypatch.setattr(cli_batch, "_batch", batch)
    monkeypatch.setattr(cli_batch, "RETRY_BACKOFF_S", 0.0)
    return stubs


def test_embed_follows_the_job_draws_progress_and_exits_0(
    fake: list[FakeBatch], capsys: pytest.CaptureFixture[str]
) -> None:
    done = _job(pb.JOB_STATE_SUCCEEDED, rows_total=4, rows_done=4)
    fake.append(FakeBatch([_job(pb.JOB_STATE_QUEUED), _job(rows_total=4, rows_done=2), done]))
    argv = ["batch", "embed", "--input", "/i.parquet", "--output", "/o", "--progress"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("jobs/abc  succeeded  4 of 4 rows written  0 failed")
    frames = err.split("\r")[1:]
    assert frames[0].startswith("batch jobs/abc  queued")
    assert frames[-1].startswith("batch jobs/abc  [####################]  100%  4/4 rows")
    assert err.endswith("\n") and err.count("\n") == 1
    assert fake[0].created[0].job.stages[0].model.task == pb.TASK_EMBED


def test_no_wait_prints_the_operations_name_only(
    fake: list[FakeBatch], capsys: pytest.CaptureFixture[str]
) -> None:
    fake.append(FakeBatch())
    argv = ["batch", "embed", "--input", "/i.parquet", "--output", "/o", "--no-wait"]
    assert cli.main(argv) == 0
    assert capsys.readouterr() == ("jobs/abc\n", "")


def test_a_failed_job_exits_1_with_its_error(
    fake: list[FakeBatch], capsys: pytest.CaptureFixture[str]
) -> None:
    failed = _job(pb.JOB_STATE_FAILED, rows_total=4, rows_done=1, rows_failed=3)
    failed.error.CopyFrom(status_pb2.Status(code=9, message="3 rows failed, more than 2"))
    fake.append(FakeBatch([failed]))
    assert cli.main(["batch", "watch", "abc", "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert "  error   FAILED_PRECONDITION: 3 rows failed, more than 2" in out
    assert err == "error: jobs/abc failed: 3 rows failed, more than 2\n"


def test_json_prints_the_final_job_and_no_progress(
    fake: list[FakeBatch], capsys: pytest.CaptureFixture[str]
) -> None:
    fake.append(FakeBatch([_job(pb.JOB_STATE_SUCCEEDED_WITH_ERRORS, rows_done=1, rows_failed=1)]))
    assert cli.main(["batch", "watch", "jobs/abc", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["job"]["state"] == "JOB_STATE_SUCCEEDED_WITH_ERRORS"
    assert err == ""


def test_a_dropped_watch_is_opened_again(
    fake: list[FakeBatch], capsys: pytest.CaptureFixture[str]
) -> None:
    fake.append(
        FakeBatch(
            [_job(rows_total=4, rows_done=1), _unavailable()],
            [_job(rows_total=4, rows_done=3)],  # ends before a final state
            [_job(pb.JOB_STATE_SUCCEEDED, rows_total=4, rows_done=4)],
        )
    )
    assert cli.main(["batch", "watch", "abc"]) == 0
    assert capsys.readouterr().out.startswith("jobs/abc  succeeded")
    fake[:] = [FakeBatch(*[[_unavailable()]] * (cli_batch.WATCH_RETRIES + 1))]
    assert cli.main(["batch", "watch", "abc"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: restart")


def test_ctrl_c_stops_watching_never_the_job_and_exits_130(
    fake: list[FakeBatch], capsys: pytest.CaptureFixture[str]
) -> None:
    async def interrupt() -> None:
        # What Ctrl-C does: asyncio.run cancels the command, then raises
        # KeyboardInterrupt.
        os.kill(os.getpid(), signal.SIGINT)
        await cli_batch.asyncio.sleep(5)

    fake.append(FakeBatch([_job(rows_total=4, rows_done=1), interrupt]))
    assert cli.main(["batch", "watch", "abc", "--progress"]) == 130
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith(
        "1/4 rows\nstopped watching; jobs/abc goes on. "
        "Cancel it with: mlmesh batch cancel jobs/abc\n"
    )

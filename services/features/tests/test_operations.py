"""Long-running operations over gRPC, on real Feast (SQLite and Redis online
stores): Materialize in chunks with progress, its values online equal to
the batch computation; a features service process killed (SIGKILL) in the
middle of a Materialize and started again resumes it; cancel; unknown
operations; GetHistoricalFeatures' parquet equal to the point-in-time join
computed directly; bad requests with their violations; a full queue."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import grpc
import numpy as np
import pandas as pd
import pytest
from features_fixtures import GOOD, events, private_online_store, service_settings
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_FEATURES
from mlmesh_chassis.errors import details_of
from mlmesh_chassis.testing import bootstrap_keys_file, expect_error, keyed_channel
from mlmesh_features.batch import EVENT_TIMESTAMP, compute_view, point_in_time_join
from mlmesh_features.definitions import parse
from mlmesh_features.operations import SourceEvents, chunk_rows, plan_chunks
from mlmesh_features.server import build_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT
VIEWS = ["user_purchases", "user_spend"]
FEATURES = {
    "user_purchases": ["doubled", "big"],
    "user_spend": ["spend_1d", "purchases_1h", "categories_1d"],
}


@pytest.fixture(params=["sqlite", "redis"])
async def service(request, repo, tmp_path):
    """An in-process service with small chunks (10 events) and a short queue."""
    store, source, frame = repo
    online, redis = private_online_store(request.param, tmp_path)
    settings, secret = service_settings(
        tmp_path,
        root=store.root,
        online_store=online,
        store_timeout_seconds=5.0,
        materialize_chunk_events=10,
        max_pending_operations=3,
    )
    host = await build_server(settings)
    async with keyed_channel(f"127.0.0.1:{host.port}", secret) as channel:
        stub = features_service_pb2_grpc.FeatureServiceStub(channel)
        await stub.ApplyFeatureDefinitions(
            rpc.ApplyFeatureDefinitionsRequest(source=source, source_name="repo.yaml")
        )
        yield stub, source, frame, redis
    await host.shutdown()
    if redis is not None:
        redis.stop()


async def wait_done(stub, name: str, timeout_s: float = 120.0) -> pb.Operation:
    """Polls ``name`` until done; on every poll, a not-done operation has
    chunks left and a done one that succeeded has none."""
    async with asyncio.timeout(timeout_s):
        while True:
            operation = (await stub.GetOperation(rpc.GetOperationRequest(name=name))).operation
            check_progress(operation)
            if operation.done:
                return operation
            await asyncio.sleep(0.05)


def check_progress(operation: pb.Operation) -> None:
    meta = operation.metadata
    assert meta.done_chunks <= meta.total_chunks
    if operation.metadata.state == pb.OPERATION_STATE_SUCCEEDED:
        assert operation.done and meta.done_chunks == meta.total_chunks > 0
        assert operation.WhichOneof("result") == "response"
    elif not operation.done:
        assert meta.state in (pb.OPERATION_STATE_PENDING, pb.OPERATION_STATE_RUNNING)
        assert operation.WhichOneof("result") is None


def expected_online(source: str, frame: pd.DataFrame, end: pd.Timestamp) -> dict:
    """The batch computation's latest row per (view, user) up to ``end``."""
    defs = parse(source)
    latest = {}
    for view in VIEWS:
        rows = compute_view(defs, defs.feature_views[view], frame)
        rows = rows[rows[EVENT_TIMESTAMP] <= end].sort_values(EVENT_TIMESTAMP, kind="stable")
        latest[view] = rows.drop_duplicates("user_id", keep="last").set_index("user_id")
    return latest


async def check_online_values(stub, source: str, frame: pd.DataFrame, end: pd.Timestamp) -> None:
    """Every user's online values equal the batch computation's latest."""
    expected = expected_online(source, frame, end)
    users = sorted(frame.user_id.unique())
    for view, names in FEATURES.items():
        read = await stub.GetOnlineFeatures(
            rpc.GetOnlineFeaturesRequest(
                features=rpc.FeatureReferences(references=[f"{view}:{n}" for n in names]),
                entity_rows=[
                    pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=int(u))})
                    for u in users
                ],
            )
        )
        ttl = parse(source).feature_views[view].ttl
        for user, row in zip(users, read.rows, strict=True):
            want = expected[view].loc[user]
            for name, value in zip(names, row.values, strict=True):
                assert value.event_time.ToNanoseconds() == want[EVENT_TIMESTAMP].value
                if ttl and pd.Timestamp.now(tz="UTC") - want[EVENT_TIMESTAMP] > ttl:
                    assert value.status == pb.FEATURE_STATUS_OUTSIDE_MAX_AGE
                    continue
                assert value.status == pb.FEATURE_STATUS_PRESENT, (view, user, name)
                got = value.value
                if isinstance(want[name], bool | np.bool_):
                    assert got.bool_value == bool(want[name])
                else:
                    assert got.number_value == pytest.approx(float(want[name]), rel=1e-12)


# ---- chunks ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_events", [1, 7, 50, 10_000])
def test_chunks_together_are_the_whole_computation(repo, chunk_events):
    """Chunk by chunk, each from the events it needs only, the rows are
    exactly those of the whole computation, and a chunk holds about
    ``chunk_events`` events (a windowed view's chunk spans its window)."""
    _, source, frame = repo
    defs = parse(source)
    events = SourceEvents(frame, "event_time")
    end = pd.Timestamp(frame.event_time.max() + pd.Timedelta(days=2)).value
    for name in VIEWS:
        view = defs.feature_views[name]
        lead = pd.Timedelta(days=1).value if view.windowed else 0
        bounds = plan_chunks(events, None, end, chunk_events, lead)
        assert bounds[0] == events.times[0] and bounds[-1] == end + 1
        for lo, hi in itertools.pairwise(bounds[:-1]):
            assert hi - lo >= max(lead, 1)
            if not view.windowed:
                assert len(events.between(lo, hi)) <= chunk_events + 1
        chunked = pd.concat(
            [chunk_rows(defs, view, events, lo, hi) for lo, hi in itertools.pairwise(bounds)]
        )
        whole = compute_view(defs, view, frame)
        key = ["user_id", EVENT_TIMESTAMP]
        pd.testing.assert_frame_equal(
            chunked.sort_values(key, kind="stable").reset_index(drop=True),
            whole.sort_values(key, kind="stable").reset_index(drop=True),
            check_exact=False,
            rtol=1e-12,
        )


# ---- in process ------------------------------------------------------------------------


async def test_materialize_runs_in_chunks_to_completion_and_serves_the_batch_values(service):
    stub, source, frame, _ = service
    started = await stub.Materialize(rpc.MaterializeRequest(feature_views=VIEWS))
    operation = started.operation
    assert operation.name.startswith("operations/") and not operation.done
    assert operation.metadata.kind == pb.OPERATION_KIND_MATERIALIZE
    assert list(operation.metadata.feature_views) == VIEWS
    done = await wait_done(stub, operation.name)
    meta = done.metadata
    assert meta.state == pb.OPERATION_STATE_SUCCEEDED and meta.resumed_count == 0
    # 400 events, 10 a chunk for the row view; the windowed view's chunks
    # span at least its 1-day window (the data spans 3 days)
    assert meta.total_chunks > 40
    result = done.response.materialize
    assert result.rows_written == meta.rows_written > 0
    assert done.metadata.end_time.ToNanoseconds() >= meta.create_time.ToNanoseconds()
    end = pd.Timestamp(result.end_time.ToNanoseconds(), tz="UTC")
    assert result.start_time.ToNanoseconds() == pd.Timestamp(frame.event_time.min()).value
    await check_online_values(stub, source, frame, end)
    # listed newest first, paged
    second = (
        await stub.Materialize(rpc.MaterializeRequest(feature_views=["user_spend"]))
    ).operation
    await wait_done(stub, second.name)
    first_page = await stub.ListOperations(rpc.ListOperationsRequest(page_size=1))
    assert [o.name for o in first_page.operations] == [second.name]
    rest = await stub.ListOperations(
        rpc.ListOperationsRequest(page_size=5, page_token=first_page.next_page_token)
    )
    assert [o.name for o in rest.operations] == [operation.name] and not rest.next_page_token
    await expect_error(stub.ListOperations(rpc.ListOperationsRequest(page_token="x1")), INVALID)


async def test_cancel_stops_after_the_current_chunk(service):
    stub, _, _, _ = service
    running = (await stub.Materialize(rpc.MaterializeRequest(feature_views=VIEWS))).operation
    waiting = (await stub.Materialize(rpc.MaterializeRequest(feature_views=VIEWS))).operation
    # the second waits behind the first: cancelled at once
    cancelled = (
        await stub.CancelOperation(rpc.CancelOperationRequest(name=waiting.name))
    ).operation
    assert cancelled.done and cancelled.metadata.state == pb.OPERATION_STATE_CANCELLED
    assert cancelled.error.code == code_pb2.CANCELLED and cancelled.metadata.done_chunks == 0
    async with asyncio.timeout(30):
        while True:
            got = await stub.GetOperation(rpc.GetOperationRequest(name=running.name))
            if got.operation.metadata.done_chunks >= 1:
                break
            await asyncio.sleep(0.02)
    await stub.CancelOperation(rpc.CancelOperationRequest(name=running.name))
    done = await wait_done(stub, running.name)
    assert done.metadata.state == pb.OPERATION_STATE_CANCELLED
    assert 1 <= done.metadata.done_chunks < done.metadata.total_chunks
    assert done.error.code == code_pb2.CANCELLED
    info = error_details_pb2.ErrorInfo()
    assert done.error.details[0].Unpack(info) and info.domain == "mlmesh.features"
    assert info.reason == "OPERATION_CANCELLED"
    assert info.metadata["operation"] == running.name.split("/")[1]
    # a done operation is returned unchanged
    again = await stub.CancelOperation(rpc.CancelOperationRequest(name=running.name))
    assert again.operation == done


async def test_unknown_operations_are_not_found(service):
    stub, _, _, _ = service
    for call in (
        stub.GetOperation(rpc.GetOperationRequest(name="operations/nope")),
        stub.CancelOperation(rpc.CancelOperationRequest(name="operations/nope")),
    ):
        details = await expect_error(call, grpc.StatusCode.NOT_FOUND)
        assert details.error_info.reason == "OPERATION_NOT_FOUND"
        assert details.error_info.metadata["name"] == "operations/nope"
    await expect_error(stub.GetOperation(rpc.GetOperationRequest(name="ops/../../x")), INVALID)


def _timed(user, when: pd.Timestamp) -> pb.TimedEntityRow:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(when.value)
    value = struct_pb2.Value(number_value=user) if isinstance(user, int) else user
    return pb.TimedEntityRow(join_keys={"user_id": value}, event_time=stamp)


async def test_historical_features_equal_the_point_in_time_join(service):
    stub, source, frame, _ = service
    rng = random.Random(3)
    lo, hi = frame.event_time.min(), frame.event_time.max()
    times = [
        lo + (hi - lo) * rng.random() + pd.Timedelta(hours=rng.choice([0, 30])) for _ in range(200)
    ]
    users = [rng.randrange(7) for _ in times]  # 5 and 6 are unknown: nulls
    started = await stub.GetHistoricalFeatures(
        rpc.GetHistoricalFeaturesRequest(
            feature_service="fraud_model",
            entity_rows=[_timed(u, t) for u, t in zip(users, times, strict=True)],
            full_feature_names=True,
        )
    )
    assert started.operation.metadata.kind == pb.OPERATION_KIND_HISTORICAL_FEATURES
    done = await wait_done(stub, started.operation.name)
    assert done.metadata.state == pb.OPERATION_STATE_SUCCEEDED
    result = done.response.historical_features
    assert result.row_count == len(times)
    names = ["user_spend__spend_1d", "user_purchases__doubled", "user_purchases__big"]
    assert list(result.feature_names) == names
    path = Path(urlparse(result.output_uri).path)
    assert path.parent.name == "historical" and path.name == f"{done.name.split('/')[1]}.parquet"
    got = pd.read_parquet(path)
    defs = parse(source)
    entity_rows = pd.DataFrame({"user_id": users, EVENT_TIMESTAMP: times})
    view_rows = {v: compute_view(defs, defs.feature_views[v], frame) for v in VIEWS}
    features = list(defs.feature_services["fraud_model"].features)
    want = point_in_time_join(defs, entity_rows, features, view_rows, full_feature_names=True)
    assert list(got.columns) == ["user_id", EVENT_TIMESTAMP, *names]
    assert got[names[1]].notna().any() and got[names[1]].isna().any()
    pd.testing.assert_frame_equal(
        got, want, check_dtype=False, check_exact=False, rtol=1e-12, check_index_type=False
    )


async def test_bad_requests_name_their_fields(service):
    stub, _, _, _ = service
    now = pd.Timestamp.now(tz="UTC")
    details = await expect_error(
        stub.GetHistoricalFeatures(
            rpc.GetHistoricalFeaturesRequest(
                feature_service="fraud_model",
                entity_rows=[
                    _timed(1, now),
                    _timed(struct_pb2.Value(number_value=1.5), now),
                    _timed(struct_pb2.Value(string_value="x"), now),
                    pb.TimedEntityRow(
                        join_keys={"user_id": struct_pb2.Value(number_value=2)},
                        event_time=timestamp_pb2.Timestamp(seconds=-5),
                    ),
                    pb.TimedEntityRow(
                        join_keys={"other": struct_pb2.Value(number_value=2)},
                        event_time=timestamp_pb2.Timestamp(seconds=5),
                    ),
                ],
            )
        ),
        INVALID,
    )
    assert [v.field for v in details.bad_request.field_violations] == [
        "entity_rows[1].join_keys.user_id",
        "entity_rows[2].join_keys.user_id",
        "entity_rows[3].event_time",
        "entity_rows[4].join_keys.user_id",
    ]
    details = await expect_error(
        stub.GetHistoricalFeatures(
            rpc.GetHistoricalFeaturesRequest(
                features=rpc.FeatureReferences(references=["ghost:x"]),
                entity_rows=[_timed(1, now)],
            )
        ),
        INVALID,
    )
    assert details.bad_request.field_violations[0].field == "features.references[0]"
    details = await expect_error(
        stub.Materialize(rpc.MaterializeRequest(feature_views=["user_spend", "ghost"])), INVALID
    )
    assert [v.field for v in details.bad_request.field_violations] == ["feature_views[1]"]
    later, earlier = timestamp_pb2.Timestamp(seconds=2_000_000), timestamp_pb2.Timestamp(seconds=5)
    details = await expect_error(
        stub.Materialize(rpc.MaterializeRequest(start_time=later, end_time=earlier)), INVALID
    )
    assert [v.field for v in details.bad_request.field_violations] == ["start_time"]
    listed = await stub.ListOperations(rpc.ListOperationsRequest())
    assert list(listed.operations) == []  # nothing was started


@pytest.mark.parametrize("service", ["sqlite"], indirect=True)
async def test_a_full_queue_is_resource_exhausted_with_retry_info(service):
    stub, _, _, _ = service
    names: list[str] = []
    # Three may wait and one run (max_pending_operations=3); the runner may
    # finish one while the calls arrive, so keep asking (each runs for tens of
    # milliseconds; twenty calls take less): one must be refused.
    refused = None
    for _ in range(20):
        try:
            started = await stub.Materialize(rpc.MaterializeRequest(feature_views=VIEWS))
        except grpc.aio.AioRpcError as error:
            refused = error
            break
        names.append(started.operation.name)
    assert refused is not None, "twenty operations were all accepted"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(names) >= 3  # never refused below the limit
    details = details_of(refused)
    assert details.quota_failure.violations[0].subject == "operations"
    assert details.retry_info.retry_delay.ToNanoseconds() > 0
    for name in names:
        await stub.CancelOperation(rpc.CancelOperationRequest(name=name))


@pytest.mark.parametrize("service", ["redis"], indirect=True)
async def test_a_store_that_stays_down_fails_the_operation_with_unavailable(service):
    stub, _, _, redis = service
    redis.stop()
    operation = (await stub.Materialize(rpc.MaterializeRequest(feature_views=VIEWS))).operation
    done = await wait_done(stub, operation.name, timeout_s=60)
    assert done.metadata.state == pb.OPERATION_STATE_FAILED and done.metadata.done_chunks == 0
    assert done.error.code == code_pb2.UNAVAILABLE
    info = error_details_pb2.ErrorInfo()
    assert done.error.details[0].Unpack(info) and info.reason == "BACKEND_UNAVAILABLE"
    redis.start()


# ---- a killed process ----------------------------------------------------------------------


class ServiceProcess:
    """`python -m mlmesh_features` as a process of its own (killable)."""

    def __init__(self, folder: Path, root: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.port_file = folder / "features.port"
        self.env = {
            **os.environ,
            "MLMESH_FEATURES_ROOT": str(root),
            "MLMESH_FEATURES_PORT": "0",
            "MLMESH_FEATURES_METRICS_PORT": "-1",
            "MLMESH_FEATURES_PORT_FILE": str(self.port_file),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> int:
        self.port_file.unlink(missing_ok=True)
        self.starts += 1
        with (self.folder / f"features-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlmesh_features"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 90
        while not self.port_file.exists():
            assert self.process.poll() is None, (
                self.folder / f"features-{self.starts}.log"
            ).read_text()
            assert time.monotonic() < deadline, "the features service did not start"
            time.sleep(0.1)
        return int(json.loads(self.port_file.read_text())["port"])

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def big_events(users: int = 300, n: int = 20_000) -> pd.DataFrame:
    """``n`` events of ``users`` over 3 days up to 2 hours ago."""
    frame = events(n, seed=11)
    frame["user_id"] = [random.Random(i).randrange(users) for i in range(n)]
    shift = pd.Timestamp.now(tz="UTC").floor("h") - frame.event_time.max() - pd.Timedelta(hours=2)
    frame["event_time"] = frame.event_time + shift
    return frame


async def test_a_killed_service_resumes_its_materialize_after_the_last_chunk(tmp_path):
    data = tmp_path / "purchases.parquet"
    frame = big_events()
    frame.to_parquet(data)
    source = GOOD.replace("data/purchases.parquet", str(data))
    keys, secret = bootstrap_keys_file(tmp_path, [PLATFORM_SERVICE_FEATURES])
    service = ServiceProcess(
        tmp_path,
        tmp_path / "store",
        {
            "MLMESH_FEATURES_BOOTSTRAP_KEYS_FILE": str(keys),
            "MLMESH_FEATURES_MATERIALIZE_CHUNK_EVENTS": "1000",
        },
    )
    try:
        port = await asyncio.to_thread(service.start)
        async with keyed_channel(f"127.0.0.1:{port}", secret) as channel:
            stub = features_service_pb2_grpc.FeatureServiceStub(channel)
            await stub.ApplyFeatureDefinitions(
                rpc.ApplyFeatureDefinitionsRequest(source=source, source_name="repo.yaml")
            )
            operation = (
                await stub.Materialize(rpc.MaterializeRequest(feature_views=VIEWS))
            ).operation
            async with asyncio.timeout(60):
                while True:
                    got = await stub.GetOperation(rpc.GetOperationRequest(name=operation.name))
                    check_progress(got.operation)
                    assert not got.operation.done, "it finished before the kill: more data"
                    if got.operation.metadata.done_chunks >= 3:
                        break
                    await asyncio.sleep(0.02)
            before = got.operation.metadata
            service.kill()
        port = await asyncio.to_thread(service.start)
        async with keyed_channel(f"127.0.0.1:{port}", secret) as channel:
            stub = features_service_pb2_grpc.FeatureServiceStub(channel)
            resumed = (
                await stub.GetOperation(rpc.GetOperationRequest(name=operation.name))
            ).operation
            # it goes on after the last chunk it committed, not from the start
            assert resumed.metadata.resumed_count == 1
            assert resumed.metadata.done_chunks >= before.done_chunks
            assert resumed.metadata.total_chunks == before.total_chunks
            done = await wait_done(stub, operation.name, timeout_s=240)
            assert done.metadata.state == pb.OPERATION_STATE_SUCCEEDED
            assert done.metadata.resumed_count == 1
            end = pd.Timestamp(done.response.materialize.end_time.ToNanoseconds(), tz="UTC")
            await check_online_values(stub, source, frame, end)
    finally:
        service.stop()

"""The event log: files named by sequence, written whole, numbers never
shared (threads and processes) and recovered after a restart; and
IngestEvents over gRPC on a real server: every event checked, all or
nothing, the batch path reading what was ingested."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pandas as pd
import pytest
from features_fixtures import GOOD, service_settings
from google.protobuf import struct_pb2, timestamp_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh_chassis.testing import expect_error, keyed_channel
from mlmesh_features.definitions import Source, parse
from mlmesh_features.server import build_server
from mlmesh_features.store import FeatureStore
from mlmesh_features.streaming import eventlog
from mlmesh_features.streaming.eventlog import EventLog, read_events, source_directory

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SOURCE = Source(
    "clicks",
    "stream",
    "",
    "event_time",
    {"user_id": "int64", "amount": "double", "page": "string", "ok": "bool"},
)
T0 = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _event(user: int, seconds: float = 0.0, **override) -> dict:
    event = {
        "user_id": user,
        "amount": 1.5 * user,
        "page": f"p{user}",
        "ok": user % 2 == 0,
        "event_time": T0 + timedelta(seconds=seconds),
    }
    return {**event, **override}


def _visible(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(source_directory(root, SOURCE.name)) if n[0] != ".")


def test_round_trip_keeps_types_order_and_milliseconds(tmp_path):
    log = EventLog(tmp_path)
    assert log.append(SOURCE, [_event(1), _event(2, 1), _event(3, -5, page=None)]) == (0, 3)
    assert log.append(SOURCE, [_event(2**62, 2)]) == (3, 1)
    assert _visible(tmp_path) == ["00000000000000000000-3.jsonl", "00000000000000000003-1.jsonl"]
    first_file = source_directory(tmp_path, "clicks") / _visible(tmp_path)[0]
    first_line = json.loads(first_file.read_text().splitlines()[0])
    assert first_line == {
        "user_id": 1,
        "amount": 1.5,
        "page": "p1",
        "ok": False,
        "_event_time_ms": int(T0.timestamp() * 1000),
        "_seq": 0,
    }
    frame = read_events(tmp_path, SOURCE)
    assert list(frame.columns) == ["user_id", "amount", "page", "ok", "event_time", "_seq"]
    assert frame["_seq"].tolist() == [0, 1, 2, 3]
    assert frame["user_id"].tolist() == [1, 2, 3, 2**62]
    assert frame["page"].isna().tolist() == [False, False, True, False]
    # truncated to the millisecond, in UTC
    assert frame["event_time"][0] == pd.Timestamp("2026-11-01 12:00:00.123", tz="UTC")
    assert str(frame["event_time"].dtype) == "datetime64[ns, UTC]"


def test_an_empty_or_missing_log_reads_as_no_events(tmp_path):
    frame = read_events(tmp_path, SOURCE)
    assert frame.empty and list(frame.columns) == [*SOURCE.columns, "event_time", "_seq"]


def test_the_next_sequence_is_recovered_after_a_restart(tmp_path):
    EventLog(tmp_path).append(SOURCE, [_event(i) for i in range(5)])
    EventLog(tmp_path).append(SOURCE, [_event(9)])
    again = EventLog(tmp_path)
    assert again.append(SOURCE, [_event(1), _event(2)]) == (6, 2)
    assert read_events(tmp_path, SOURCE)["_seq"].tolist() == list(range(8))


def test_a_crash_mid_write_leaves_no_visible_file(tmp_path, monkeypatch):
    log = EventLog(tmp_path)
    log.append(SOURCE, [_event(1)])

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(eventlog.os, "replace", crash)
    with pytest.raises(OSError):
        log.append(SOURCE, [_event(2), _event(3)])
    monkeypatch.undo()
    directory = source_directory(tmp_path, "clicks")
    assert (directory / ".00000000000000000001-2.jsonl.tmp").exists()  # hidden: Flink skips it
    assert _visible(tmp_path) == ["00000000000000000000-1.jsonl"]
    assert read_events(tmp_path, SOURCE)["_seq"].tolist() == [0]
    # the number was never visible, so it is given again; the half file goes
    assert EventLog(tmp_path).append(SOURCE, [_event(4)]) == (1, 1)
    assert not (directory / ".00000000000000000001-2.jsonl.tmp").exists()
    assert read_events(tmp_path, SOURCE)["user_id"].tolist() == [1, 4]


def _append_many(root: str, times: int) -> None:
    log = EventLog(Path(root))
    for i in range(times):
        log.append(SOURCE, [_event(i), _event(i + 1)])


def test_concurrent_appends_never_share_a_sequence(tmp_path):
    # Threads of one process share an EventLog; other processes have their own.
    log = EventLog(tmp_path)
    threads = [
        threading.Thread(target=lambda: [log.append(SOURCE, [_event(1)]) for _ in range(25)])
        for _ in range(4)
    ]
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_append_many, args=(str(tmp_path), 25)) for _ in range(2)]
    for worker in [*threads, *processes]:
        worker.start()
    for worker in [*threads, *processes]:
        worker.join(60)
    assert all(p.exitcode == 0 for p in processes)
    total = 4 * 25 + 2 * 25 * 2
    assert read_events(tmp_path, SOURCE)["_seq"].tolist() == list(range(total))
    assert len(_visible(tmp_path)) == 4 * 25 + 2 * 25


def test_append_refuses_what_does_not_fit_and_writes_nothing(tmp_path):
    log = EventLog(tmp_path)
    for bad in (
        [_event(1), _event(2, user_id="7")],  # a string for an int64
        [_event(1, amount=float("nan"))],  # JSON holds no NaN
        [_event(1, ok=1)],  # an int is not a bool
        [_event(1, user_id=True)],  # nor a bool an int
        [_event(1, user_id=2**63)],  # beyond int64
        [{**_event(1), "extra": 1}],
        [{k: v for k, v in _event(1).items() if k != "page"}],
        [_event(1, event_time=datetime(2026, 11, 1))],  # no time zone
        [],
        [_event(1)] * (eventlog.MAX_EVENTS_PER_APPEND + 1),
    ):
        with pytest.raises(ValueError):
            log.append(SOURCE, bad)
    with pytest.raises(ValueError):
        log.append(Source("b", "batch", "x.parquet", "event_time", {"user_id": "int64"}), [])
    assert read_events(tmp_path, SOURCE).empty


# ---- IngestEvents over gRPC --------------------------------------------------------------


@pytest.fixture
async def service(repo, tmp_path):
    store, source, _ = repo
    # a batch source too, to be refused
    source = source.replace(
        "feature_views:",
        "  - name: ledger\n    kind: batch\n    path: x.parquet\n    timestamp_field: t\n"
        "    columns: {user_id: int64}\nfeature_views:",
    )
    settings, secret = service_settings(
        tmp_path,
        root=store.root,
        store_timeout_seconds=5.0,
    )
    host = await build_server(settings)
    async with keyed_channel(f"127.0.0.1:{host.port}", secret) as channel:
        stub = features_service_pb2_grpc.FeatureServiceStub(channel)
        await stub.ApplyFeatureDefinitions(rpc.ApplyFeatureDefinitionsRequest(source=source))
        yield stub, store.root
    await host.shutdown()


def _number(value: float) -> struct_pb2.Value:
    return struct_pb2.Value(number_value=value)


def _wire_event(user: float, when: datetime, **override) -> pb.Event:
    values = {
        "user_id": _number(user),
        "amount": _number(10.0),
        "category": struct_pb2.Value(string_value="books"),
        **override,
    }
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return pb.Event(values={k: v for k, v in values.items() if v is not None}, event_time=stamp)


def _ingest(*events: pb.Event, source: str = "purchases") -> rpc.IngestEventsRequest:
    return rpc.IngestEventsRequest(source=source, events=list(events))


PURCHASES = parse(GOOD).sources["purchases"]


async def test_ingest_appends_and_the_batch_path_reads_the_log(service):
    stub, root = service
    now = datetime.now(UTC).replace(microsecond=0)
    first = await stub.IngestEvents(_ingest(*(_wire_event(u, now) for u in (1, 2, 3))))
    assert (first.accepted_events, first.first_sequence) == (3, 0)
    many = [_wire_event(i % 7, now - timedelta(seconds=i)) for i in range(10_000)]
    big = await stub.IngestEvents(_ingest(*many))
    assert (big.accepted_events, big.first_sequence) == (10_000, 3)
    logged = read_events(root, PURCHASES)
    assert len(logged) == 10_003 and logged["_seq"].tolist() == list(range(10_003))
    # Materialize reads a stream source's log after its backfill parquet.
    store = FeatureStore(root)
    events = store.source_events(store.definitions.sources["purchases"])
    backfill = pd.read_parquet(store.definitions.sources["purchases"].path)
    assert len(events) == len(backfill) + 10_003
    assert store.materialize("user_purchases") > 0
    read = await stub.GetOnlineFeatures(
        rpc.GetOnlineFeaturesRequest(
            features=rpc.FeatureReferences(references=["user_purchases:doubled"]),
            entity_rows=[pb.EntityRow(join_keys={"user_id": _number(1)})],
        )
    )
    value = read.rows[0].values[0]
    assert value.status == pb.FEATURE_STATUS_PRESENT and value.value.number_value == 20.0
    assert value.event_time.seconds == int(now.timestamp())


async def test_bad_events_name_their_fields_and_append_nothing(service):
    stub, root = service
    now = datetime.now(UTC)
    good = [_wire_event(1, now)] * 9_999
    cases = [
        (_wire_event(1, now, user_id=struct_pb2.Value(string_value="x")), "values.user_id"),
        (_wire_event(1, now, user_id=_number(1.5)), "values.user_id"),
        (_wire_event(1, now, amount=struct_pb2.Value(string_value="10")), "values.amount"),
        (_wire_event(1, now, amount=_number(float("inf"))), "values.amount"),
        (_wire_event(1, now, category=_number(3)), "values.category"),
        (_wire_event(1, now, category=None), "values.category"),
        (_wire_event(1, now, coupon=struct_pb2.Value(bool_value=True)), "values"),
        (_wire_event(1, now + timedelta(hours=2)), "event_time"),
    ]
    for bad, field in cases:
        details = await expect_error(stub.IngestEvents(_ingest(*good, bad)), INVALID)
        violation = details.bad_request.field_violations[0]
        assert violation.field == f"events[9999].{field}", violation
    unknown = _wire_event(1, now, coupon=struct_pb2.Value(bool_value=True))
    details = await expect_error(stub.IngestEvents(_ingest(unknown)), INVALID)
    assert "no column 'coupon'" in details.bad_request.field_violations[0].description
    # every event wrong: a bounded list of violations
    details = await expect_error(
        stub.IngestEvents(_ingest(*[_wire_event(1, now, amount=None)] * 10_000)), INVALID
    )
    shown = details.bad_request.field_violations
    assert shown[0].field == "events[0].values.amount" and "left out" in shown[-1].description
    # more than the contract allows
    await expect_error(stub.IngestEvents(_ingest(*[_wire_event(1, now)] * 10_001)), INVALID)
    assert read_events(root, PURCHASES).empty


async def test_only_known_stream_sources_take_events(service):
    stub, root = service
    now = datetime.now(UTC)
    details = await expect_error(
        stub.IngestEvents(_ingest(_wire_event(1, now), source="nowhere")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details.error_info.reason == "DATA_SOURCE_NOT_FOUND"
    await expect_error(
        stub.IngestEvents(_ingest(_wire_event(1, now), source="ledger")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await expect_error(stub.IngestEvents(_ingest(_wire_event(1, now), source="Bad-Name")), INVALID)
    assert not (root / "eventlog" / "ledger").exists()

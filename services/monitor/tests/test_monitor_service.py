"""The monitor over gRPC, in process: ingest (idempotent, all or nothing),
feedback joins (first, same, different label, unknown ids counted),
quality per version over windows and buckets, drift (PSI against a
hand-computed value), bad input refused with details, and the scopes."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from mlmesh.gateway.v1.gateway_pb2 import (
    PLATFORM_SERVICE_INFER,
    PLATFORM_SERVICE_MONITOR,
    PLATFORM_SERVICE_MONITOR_INGEST,
)
from mlmesh.monitor.v1 import monitor_pb2 as pb
from mlmesh.monitor.v1 import monitor_service_pb2 as rpc
from mlmesh.monitor.v1 import monitor_service_pb2_grpc
from mlmesh_chassis.testing import (
    directory_key,
    expect_error,
    fresh_postgres_database,
    keyed_channel,
)
from mlmesh_monitor import drift
from mlmesh_monitor.config import MonitorSettings
from mlmesh_monitor.server import build_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT
KEY = "0123456789abcdef"


def _keys_file(folder: Path) -> tuple[Path, dict[str, str]]:
    """Bootstrap keys: an ingest key, a reader key, a key of neither scope."""
    from google.protobuf import json_format
    from mlmesh.gateway.v1 import key_directory_service_pb2 as kd

    entries, secrets = [], {}
    for name, scopes in (
        ("ingest", [PLATFORM_SERVICE_MONITOR_INGEST]),
        ("reader", [PLATFORM_SERVICE_MONITOR]),
        ("other", [PLATFORM_SERVICE_INFER]),
        ("narrow", [PLATFORM_SERVICE_MONITOR]),
    ):
        entry, secret = directory_key(scopes)
        if name == "narrow":  # a MONITOR key for the "team-*" models only
            del entry.key.scopes.model_patterns[:]
            entry.key.scopes.model_patterns.append("team-*")
        entries.append(entry)
        secrets[name] = secret
    path = folder / "keys.json"
    path.write_text(json_format.MessageToJson(kd.WatchKeysResponse(snapshot=True, keys=entries)))
    return path, secrets


class Monitor:
    def __init__(self, host: Any, channels: dict[str, grpc.aio.Channel]) -> None:
        self.host = host
        self.channels = channels
        self.ingest = monitor_service_pb2_grpc.MonitorServiceStub(channels["ingest"])
        self.reader = monitor_service_pb2_grpc.MonitorServiceStub(channels["reader"])
        self.other = monitor_service_pb2_grpc.MonitorServiceStub(channels["other"])
        self.narrow = monitor_service_pb2_grpc.MonitorServiceStub(channels["narrow"])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> Iterator[str]:
    """SQLite under the test's folder, or a fresh database on the machine's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/monitor.db"
        return
    with fresh_postgres_database("mlmesh_monitor") as url:
        yield url


@pytest.fixture
async def monitor(tmp_path, database_url):
    keys, secrets = _keys_file(tmp_path)
    settings = MonitorSettings(
        database_url=database_url,
        port=0,
        metrics_port=-1,
        drain_seconds=0.0,
        grace_seconds=1.0,
        bootstrap_keys_file=keys,
        root=tmp_path / "monitor",
        drift_min_rows=5,
        metrics_refresh_seconds=3600,
    )
    host = await build_server(settings)
    channels = {n: keyed_channel(f"127.0.0.1:{host.port}", s) for n, s in secrets.items()}
    yield Monitor(host, channels)
    for channel in channels.values():
        await channel.close()
    await host.shutdown()


def prediction(
    request_id: str,
    label: str = "1",
    *,
    version: int = 1,
    model: str = "digits",
    features: list[float] | None = None,
    latency_ms: float = 5.0,
    status: str = "OK",
    confidence: float = 0.9,
    ago: dt.timedelta = dt.timedelta(seconds=10),
) -> pb.Prediction:
    p = pb.Prediction(
        request_id=request_id,
        kind=pb.PREDICTION_KIND_INFER,
        model=model,
        version=version,
        key_id=KEY,
        input_sha256="ab" * 32,
        features=features or [],
        scores=[0.1, 0.9],
        predicted_label=label,
        confidence=confidence,
        status=status,
    )
    p.latency.FromTimedelta(dt.timedelta(milliseconds=latency_ms))
    p.time.FromDatetime(dt.datetime.now(dt.UTC) - ago)
    return p


def fields(details: Any) -> list[str]:
    assert details.bad_request is not None
    return [v.field for v in details.bad_request.field_violations]


def hours(n: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(dt.timedelta(hours=n))
    return d


def feedback(*pairs: tuple[str, str]) -> rpc.RecordFeedbackRequest:
    return rpc.RecordFeedbackRequest(
        feedback=[pb.Feedback(request_id=r, label=label) for r, label in pairs]
    )


async def quality(stub, version: int = 0, **extra: Any) -> rpc.GetModelQualityResponse:
    return await stub.GetModelQuality(
        rpc.GetModelQualityRequest(model="digits", version=version, window=hours(1), **extra)
    )


async def test_predictions_are_stored_once_by_request_id(monitor):
    first = await monitor.ingest.LogPredictions(
        rpc.LogPredictionsRequest(predictions=[prediction("a"), prediction("b")])
    )
    assert (first.stored_count, first.duplicate_count) == (2, 0)
    again = await monitor.ingest.LogPredictions(
        rpc.LogPredictionsRequest(predictions=[prediction("b", "7"), prediction("c")])
    )
    assert (again.stored_count, again.duplicate_count) == (1, 1)
    got = await quality(monitor.reader)
    assert [v.version for v in got.versions] == [1]
    assert got.versions[0].overall.request_count == 3


async def test_feedback_joins_labels_idempotently_and_counts_unknown_ids(monitor):
    await monitor.ingest.LogPredictions(
        rpc.LogPredictionsRequest(predictions=[prediction("a", "1"), prediction("b", "2")])
    )
    first = await monitor.reader.RecordFeedback(feedback(("a", "1"), ("b", "1"), ("zz", "3")))
    assert (first.recorded_count, first.unchanged_count, first.updated_count) == (2, 0, 0)
    assert first.unknown_count == 1 and list(first.unknown_request_ids) == ["zz"]
    same = await monitor.reader.RecordFeedback(feedback(("a", "1")))
    assert (same.recorded_count, same.unchanged_count, same.updated_count) == (0, 1, 0)
    # A different label replaces the earlier one (the last label given wins).
    changed = await monitor.reader.RecordFeedback(feedback(("b", "2")))
    assert (changed.recorded_count, changed.updated_count) == (0, 1)
    overall = (await quality(monitor.reader)).versions[0].overall
    assert overall.labelled_count == 2 and overall.accuracy == 1.0
    # Many unknown ids: one answer, counted, a bounded list.
    storm = await monitor.reader.RecordFeedback(feedback(*[(f"gone-{i}", "1") for i in range(300)]))
    assert storm.unknown_count == 300 and len(storm.unknown_request_ids) == 20
    assert (await quality(monitor.reader)).unknown_feedback_count == 301


async def test_quality_per_version_and_class_and_bucket(monitor):
    rows = [
        # version 1: predicted 1,1,2,2 / truth 1,2,2,2; one error, latencies 1..4
        prediction("v1-a", "1", latency_ms=1),
        prediction("v1-b", "1", latency_ms=2),
        prediction("v1-c", "2", latency_ms=3),
        prediction("v1-d", "2", latency_ms=4, status="UNAVAILABLE"),
        # version 2, and an old one outside the window
        prediction("v2-a", "3", version=2, ago=dt.timedelta(minutes=30)),
        prediction("old", "3", version=2, ago=dt.timedelta(hours=2)),
    ]
    await monitor.ingest.LogPredictions(rpc.LogPredictionsRequest(predictions=rows))
    await monitor.reader.RecordFeedback(
        feedback(("v1-a", "1"), ("v1-b", "2"), ("v1-c", "2"), ("v1-d", "2"), ("v2-a", "3"))
    )
    got = await quality(monitor.reader, bucket=duration_pb2.Duration(seconds=900))
    assert [v.version for v in got.versions] == [1, 2]
    one = got.versions[0].overall
    assert one.request_count == 4 and one.error_rate == 0.25
    assert one.latency_p50.ToTimedelta() == dt.timedelta(milliseconds=2)
    assert one.latency_p99.ToTimedelta() == dt.timedelta(milliseconds=4)
    assert one.labelled_count == 4 and one.accuracy == 0.75
    classes = {c.label: c for c in one.classes}
    assert (classes["1"].precision, classes["1"].recall) == (0.5, 1.0)
    assert (classes["2"].precision, classes["2"].recall) == (1.0, 2 / 3)
    assert math.isclose(one.macro_precision, 0.75) and math.isclose(one.macro_recall, 5 / 6)
    assert len(got.versions[0].buckets) == 4
    assert sum(b.request_count for b in got.versions[0].buckets) == 4
    assert got.versions[0].buckets[-1].request_count == 4  # all ten seconds old
    assert got.versions[1].overall.request_count == 1  # "old" is outside the hour
    only_two = await quality(monitor.reader, version=2)
    assert [v.version for v in only_two.versions] == [2]


def reference(**extra: Any) -> pb.DriftReference:
    return pb.DriftReference(
        model="digits",
        version=1,
        features=[
            pb.FeatureBins(index=0, name="x", edges=[0.0, 1.0], proportions=[0.25, 0.5, 0.25])
        ],
        **extra,
    )


async def test_drift_is_psi_against_the_reference(monitor):
    stored = await monitor.reader.SetDriftReference(
        rpc.SetDriftReferenceRequest(reference=reference())
    )
    assert stored.reference.warn_threshold == 0.1 and stored.reference.alert_threshold == 0.25
    # 10 rows: 5 at or under 0, 5 in (0, 1], none above 1.
    values = [-1.0] * 4 + [0.0] + [0.5] * 5
    await monitor.ingest.LogPredictions(
        rpc.LogPredictionsRequest(
            predictions=[prediction(f"r{i}", features=[v, 9.0]) for i, v in enumerate(values)]
        )
    )
    got = await monitor.reader.GetDrift(
        rpc.GetDriftRequest(model="digits", version=1, window=hours(1))
    )
    # actual shares 0.5, 0.5, 0 (floored at 1e-4); expected 0.25, 0.5, 0.25
    expected = (0.5 - 0.25) * math.log(0.5 / 0.25) + (1e-4 - 0.25) * math.log(1e-4 / 0.25)
    assert got.row_count == 10
    assert math.isclose(got.features[0].psi, expected, rel_tol=1e-9)
    assert got.status == pb.DRIFT_STATUS_ALERT and got.features[0].status == pb.DRIFT_STATUS_ALERT
    # Per model thresholds: above it all, OK.
    await monitor.reader.SetDriftReference(
        rpc.SetDriftReferenceRequest(reference=reference(warn_threshold=5, alert_threshold=9))
    )
    relaxed = await monitor.reader.GetDrift(
        rpc.GetDriftRequest(model="digits", version=1, window=hours(1))
    )
    assert relaxed.status == pb.DRIFT_STATUS_OK
    few = await monitor.reader.GetDrift(
        rpc.GetDriftRequest(model="digits", version=1, window=hours(1), max_rows=3)
    )
    assert few.row_count == 3 and few.status == pb.DRIFT_STATUS_INSUFFICIENT_DATA
    await expect_error(
        monitor.reader.GetDrift(rpc.GetDriftRequest(model="nomodel", version=1, window=hours(1))),
        grpc.StatusCode.NOT_FOUND,
    )


def test_reference_from_training_rows_matches_its_own_shares():
    import numpy as np

    rows = np.arange(100, dtype=np.float64).reshape(100, 1)
    (feature,) = drift.reference_from_rows(rows, bins=4)
    assert list(feature.edges) == [24.75, 49.5, 74.25]
    assert list(feature.proportions) == [0.25, 0.25, 0.25, 0.25]
    assert drift.psi(feature.proportions, drift.bin_shares(rows[:, 0], feature.edges)) == 0.0


async def test_bad_input_is_refused_with_details_and_nothing_written(monitor):
    good, bad = prediction("fine"), prediction("bad")
    bad.input_sha256 = "<script>"
    details = await expect_error(
        monitor.ingest.LogPredictions(rpc.LogPredictionsRequest(predictions=[good, bad])), INVALID
    )
    assert any(v.startswith("predictions[1].input_sha256") for v in fields(details))
    assert not (await quality(monitor.reader)).versions  # "fine" was not written either
    twice = await expect_error(
        monitor.ingest.LogPredictions(
            rpc.LogPredictionsRequest(predictions=[prediction("x"), prediction("x")])
        ),
        INVALID,
    )
    assert fields(twice) == ["predictions[1].request_id"]
    await expect_error(
        monitor.ingest.LogPredictions(
            rpc.LogPredictionsRequest(predictions=[prediction(str(i)) for i in range(501)])
        ),
        INVALID,
    )
    wrong = reference()
    wrong.features[0].edges[:] = [1.0, 0.0]
    wrong.features[0].proportions[:] = [0.5, 0.5]
    details = await expect_error(
        monitor.reader.SetDriftReference(rpc.SetDriftReferenceRequest(reference=wrong)), INVALID
    )
    assert set(fields(details)) == {
        "reference.features[0].edges",
        "reference.features[0].proportions",
    }
    await expect_error(
        monitor.reader.GetModelQuality(
            rpc.GetModelQualityRequest(
                model="digits", window=hours(24), bucket=duration_pb2.Duration(seconds=60)
            )
        ),
        INVALID,
    )
    await expect_error(
        monitor.reader.GetModelQuality(rpc.GetModelQualityRequest(model="Digits", window=hours(1))),
        INVALID,
    )


async def test_scopes_ingest_only_with_ingest_reads_only_with_monitor(monitor):
    batch = rpc.LogPredictionsRequest(predictions=[prediction("s")])
    await expect_error(monitor.reader.LogPredictions(batch), grpc.StatusCode.PERMISSION_DENIED)
    await expect_error(monitor.other.LogPredictions(batch), grpc.StatusCode.PERMISSION_DENIED)
    await expect_error(quality(monitor.ingest), grpc.StatusCode.PERMISSION_DENIED)
    await expect_error(
        monitor.other.RecordFeedback(feedback(("s", "1"))), grpc.StatusCode.PERMISSION_DENIED
    )
    await expect_error(
        monitor_service_pb2_grpc.MonitorServiceStub(
            grpc.aio.insecure_channel(f"127.0.0.1:{monitor.host.port}")
        ).GetModelQuality(rpc.GetModelQualityRequest(model="digits", window=hours(1))),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_the_gauges_refresh_from_the_window(monitor):
    """The refresher (hourly in this fixture) run once by hand over the
    service's database: accuracy and drift status per model version."""
    from mlmesh_chassis.metrics import REGISTRY
    from mlmesh_monitor.analysis import Analysis
    from mlmesh_monitor.db import monitor_database
    from mlmesh_monitor.gauges import GaugeRefresher
    from mlmesh_monitor.store import MonitorStore

    await monitor.reader.SetDriftReference(rpc.SetDriftReferenceRequest(reference=reference()))
    await monitor.ingest.LogPredictions(
        rpc.LogPredictionsRequest(
            predictions=[prediction(f"g{i}", "4", features=[0.5]) for i in range(6)]
        )
    )
    await monitor.reader.RecordFeedback(feedback(("g0", "4"), ("g1", "5")))
    settings = monitor.host.settings
    database = monitor_database(settings.database)
    try:
        store = MonitorStore(database)
        await GaugeRefresher(store, Analysis(store, settings), settings).refresh()
    finally:
        await database.close()
    labels = {"model": "digits", "version": "1"}
    assert REGISTRY.get_sample_value("mlmesh_monitor_accuracy", labels) == 0.5
    assert REGISTRY.get_sample_value("mlmesh_monitor_window_predictions", labels) == 6
    assert REGISTRY.get_sample_value("mlmesh_monitor_drift_status", labels) == 3  # alert
    psi = REGISTRY.get_sample_value("mlmesh_monitor_feature_psi", {**labels, "feature": "x"})
    assert psi is not None and psi > 0.25


async def test_the_gateways_records_are_accepted_and_joined(monitor):
    """The gateway's own log, sending with an ingest key: what it builds
    passes the contract, and feedback joins to its call ids."""
    import numpy as np
    from mlmesh.gateway.v1 import gateway_service_pb2 as gw
    from mlmesh_gateway.prediction_log import INFER, PredictionLog
    from mlmesh_metering import MeteredCall

    log = PredictionLog(monitor.ingest.LogPredictions, batch_size=500)
    ids = []
    for i in range(30):
        call = MeteredCall(KEY, f"call{i:02d}", "", 0, "digits", "items", 0, version=4)
        ids.append(call.call_id)
        async with log.observe(INFER, "digits", call, gw.InferRequest(id=str(i))) as seen:
            seen.inputs = {"pixels": np.full((1, 64), float(i % 17), dtype=np.float32)}
            probabilities = np.zeros((1, 10), dtype=np.float32)
            probabilities[0, i % 10] = 1.0
            seen.outputs = {"probabilities": probabilities}
    await log.flush()
    got = await monitor.reader.RecordFeedback(
        feedback(*[(r, str(i % 10)) for i, r in enumerate(ids)])
    )
    assert got.recorded_count == 30 and got.unknown_count == 0
    overall = (await quality(monitor.reader, version=4)).versions[0].overall
    assert overall.request_count == 30 and overall.accuracy == 1.0


def test_the_demo_reference_is_the_digits_training_distribution():
    import numpy as np
    from mlmesh_monitor.demo import digits_reference
    from sklearn.datasets import load_digits

    reference = digits_reference()
    assert reference.model == "digits" and reference.version == 0
    assert len(reference.features) == 64
    rows = load_digits().data
    for feature in reference.features:
        assert math.isclose(sum(feature.proportions), 1.0, abs_tol=1e-9)
        # The training data against its own reference: no drift.
        shares = drift.bin_shares(rows[:, feature.index], feature.edges)
        assert drift.psi(feature.proportions, shares) < 1e-9
    assert reference.features[0].name == "pixel_0_0"
    assert np.all(np.diff(reference.features[20].edges) > 0)


async def test_the_declared_tables_are_what_the_migrations_make(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from mlmesh_monitor.db import metadata, monitor_database

    database = monitor_database(database_url)
    await database.migrate()
    try:
        async with database.engine.connect() as conn:
            differences = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(
                        sync,
                        opts={
                            "compare_type": True,
                            "include_name": lambda name, type_, *_: (
                                not (type_ == "table" and str(name).startswith("alembic_version"))
                            ),
                        },
                    ),
                    metadata,
                )
            )
    finally:
        await database.close()
    assert differences == []


async def test_long_reads_are_paged_without_losing_rows_at_equal_times(monitor, monkeypatch):
    from mlmesh_monitor import store

    monkeypatch.setattr(store, "PAGE", 3)
    same = prediction("t0")
    batch = []
    for i in range(10):
        p = pb.Prediction()
        p.CopyFrom(same)
        p.request_id = f"t{i}"
        p.features[:] = [0.5]
        batch.append(p)
    await monitor.ingest.LogPredictions(rpc.LogPredictionsRequest(predictions=batch))
    overall = (await quality(monitor.reader)).versions[0].overall
    assert overall.request_count == 10
    await monitor.reader.SetDriftReference(rpc.SetDriftReferenceRequest(reference=reference()))
    got = await monitor.reader.GetDrift(
        rpc.GetDriftRequest(model="digits", version=1, window=hours(1), max_rows=7)
    )
    assert got.row_count == 7


async def test_a_key_labels_and_reads_only_the_models_it_may_use(monitor):
    """A MONITOR key whose model patterns allow "team-*" only: another
    model's predictions are unknown ids to its feedback (left unlabelled),
    and that model's figures, drift and references are PERMISSION_DENIED."""
    await monitor.ingest.LogPredictions(
        rpc.LogPredictionsRequest(
            predictions=[prediction("theirs", "1"), prediction("mine", "1", model="team-a")]
        )
    )
    got = await monitor.narrow.RecordFeedback(feedback(("theirs", "2"), ("mine", "1")))
    assert (got.recorded_count, got.updated_count, got.unknown_count) == (1, 0, 1)
    assert list(got.unknown_request_ids) == ["theirs"]
    theirs = (await quality(monitor.reader)).versions[0].overall
    assert theirs.request_count == 1 and theirs.labelled_count == 0
    mine = await monitor.narrow.GetModelQuality(
        rpc.GetModelQualityRequest(model="team-a", window=hours(1))
    )
    assert mine.versions[0].overall.labelled_count == 1
    denied = grpc.StatusCode.PERMISSION_DENIED
    await expect_error(quality(monitor.narrow), denied)
    await expect_error(
        monitor.narrow.GetDrift(rpc.GetDriftRequest(model="digits", version=1, window=hours(1))),
        denied,
    )
    await expect_error(
        monitor.narrow.GetDriftReference(rpc.GetDriftReferenceRequest(model="digits")), denied
    )
    reference = pb.DriftReference(
        model="digits",
        features=[pb.FeatureBins(index=0, edges=[0.5], proportions=[0.5, 0.5])],
    )
    await expect_error(
        monitor.narrow.SetDriftReference(rpc.SetDriftReferenceRequest(reference=reference)),
        denied,
    )
    # The reader's key (every model) labels it.
    again = await monitor.reader.RecordFeedback(feedback(("theirs", "2")))
    assert again.recorded_count == 1


def test_buckets_by_bisection_match_a_plain_filter():
    from mlmesh_monitor.quality import by_version, figures
    from mlmesh_monitor.store import QualityRow

    end = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    start = end - dt.timedelta(hours=1)
    bucket = dt.timedelta(minutes=7)
    # Rows on and around the edges, two versions, out of order.
    rows = [
        QualityRow(
            1 + i % 2,
            start + dt.timedelta(minutes=(i * 13) % 61, seconds=(i * 7) % 3),
            float(i),
            "OK" if i % 5 else "INTERNAL",
            str(i % 3),
            str(i % 2),
        )
        for i in range(300)
    ]
    got = by_version(rows, start, end, bucket)
    assert [v.version for v in got] == [1, 2]
    for v in got:
        mine = [r for r in rows if r.version == v.version]
        assert len(v.buckets) == 9  # 8 of 7 minutes and one of 4
        for b in v.buckets:
            want = figures([r for r in mine if b.start <= r.time < b.end], b.start, b.end)
            assert b == want
        assert sum(b.request_count for b in v.buckets) == len(
            [r for r in mine if start <= r.time < end]
        )


def test_a_window_lists_at_most_the_busiest_classes():
    """Labels are callers' text: one QualityFigures lists the 100 classes
    seen most often, says how many it left out, and its macro figures count
    every class."""
    import datetime as dt

    from mlmesh_monitor.quality import MAX_LISTED_CLASSES, figures
    from mlmesh_monitor.store import QualityRow

    now = dt.datetime.now(dt.UTC)
    rows = [QualityRow(1, now, 1.0, "OK", "0", "0") for _ in range(50)]
    rows += [QualityRow(1, now, 1.0, "OK", "0", f"junk-{i}") for i in range(500)]
    out = figures(rows, now - dt.timedelta(hours=1), now)
    assert len(out.classes) == MAX_LISTED_CLASSES
    assert out.classes_omitted == 501 - MAX_LISTED_CLASSES
    assert out.classes[0].label == "0" and out.classes[0].support == 50  # the busiest stays
    assert out.macro_recall == pytest.approx(1 / 501)  # class "0" recalled, 500 never

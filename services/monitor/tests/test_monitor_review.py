"""Low-confidence predictions to the review queue: the monitor's check
against the real review service (in process): over the model's rate its
newest low-confidence predictions become LOW_CONFIDENCE items, once each;
under the rate, nothing is sent."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from mlmesh.monitor.v1 import monitor_pb2 as pb
from mlmesh.review.v1 import review_pb2 as rpb
from mlmesh.review.v1 import review_service_pb2 as rrpc
from mlmesh.review.v1 import review_service_pb2_grpc
from mlmesh_chassis.database import Database
from mlmesh_chassis.testing import keyed_channel
from mlmesh_monitor.db import monitor_database
from mlmesh_monitor.review import LowConfidenceReview, Policy, parse_policies
from mlmesh_monitor.store import MonitorStore
from mlmesh_review.testing import local_review

KEY = "0123456789abcdef"


def prediction(i: int, confidence: float, model: str = "digits") -> pb.Prediction:
    p = pb.Prediction(
        request_id=f"{model}-{i}",
        kind=pb.PREDICTION_KIND_INFER,
        model=model,
        version=2,
        key_id=KEY,
        input_sha256="cd" * 32,
        features=[float(i)] * 4,
        scores=[confidence, 1 - confidence - 0.01, 0.01],
        predicted_label="0",
        confidence=confidence,
        status="OK",
    )
    p.latency.FromMilliseconds(3)
    p.time.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=i + 1))
    return p


@pytest.fixture
async def review(tmp_path: Path):
    async with (
        local_review(tmp_path) as local,
        keyed_channel(local.target, local.submitter_secret) as submit_channel,
        keyed_channel(local.target, local.reviewer_secret) as reviewer_channel,
    ):
        yield (
            review_service_pb2_grpc.ReviewServiceStub(submit_channel),
            review_service_pb2_grpc.ReviewServiceStub(reviewer_channel),
        )


@pytest.fixture
async def store(tmp_path: Path):
    database: Database = monitor_database(f"sqlite+aiosqlite:///{tmp_path}/monitor.db")
    await database.migrate()
    yield MonitorStore(database)
    await database.close()


async def test_low_confidence_over_the_rate_goes_to_review_once(review, store):
    submitter, reviewer = review
    # digits: 10 of 30 under 0.6 (33% > 20%); minilm-ish "other": 1 of 30 (3%).
    rows = [prediction(i, 0.3 if i < 10 else 0.95) for i in range(30)]
    rows += [prediction(i, 0.3 if i < 1 else 0.95, model="other") for i in range(30)]
    await store.log(rows)

    async def submit(items):  # type: ignore[no-untyped-def]
        response = await submitter.SubmitItems(rrpc.SubmitItemsRequest(items=items))
        return response.created_count

    check = LowConfidenceReview(
        store,
        parse_policies("digits=0.6:0.2,other=0.6:0.2"),
        submit,
        window=dt.timedelta(hours=1),
        min_predictions=20,
        max_items=100,
    )
    assert await check.check() == 10
    assert await check.check() == 0  # sent already
    listed = await reviewer.ListItems(
        rrpc.ListItemsRequest(source=rpb.ITEM_SOURCE_LOW_CONFIDENCE, page_size=100)
    )
    assert sorted(i.source_id for i in listed.items) == sorted(f"digits-{i}" for i in range(10))
    item = listed.items[0]
    assert item.model == "digits" and item.model_version == "2"
    assert item.context["threshold"] == "0.6" and '"label": "1"' in item.alternative_output


def test_policies_are_parsed_strictly():
    assert parse_policies("digits=0.6:0.2") == {"digits": Policy(0.6, 0.2)}
    for bad in ("digits=0.6", "digits=2:0.1", "Digits=0.5:0.1", "digits=x:y"):
        with pytest.raises(ValueError):
            parse_policies(bad)


async def test_low_confidence_passes_over_the_ids_already_sent(store):
    # digits-0 is the newest (1 s ago), digits-4 the oldest.
    await store.log([prediction(i, 0.3) for i in range(5)])
    total, under, rows = await store.low_confidence(
        "digits",
        dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
        0.6,
        2,
        skip={"digits-0": None, "digits-1": None},
    )
    assert (total, under) == (5, 5)
    # The limit counts only the ids not sent yet: the next two newest.
    assert [r.request_id for r in rows] == ["digits-2", "digits-3"]
    assert list(rows[0].features) == [2.0] * 4


async def test_drift_reads_only_the_features_the_reference_needs(store):
    # Stored vectors of 4 features; a reference up to index 1 reads 2.
    await store.log([prediction(i, 0.9) for i in range(3)])
    now = dt.datetime.now(dt.UTC)
    blobs = await store.feature_rows("digits", 2, now - dt.timedelta(hours=1), now, 10, width=2)
    assert sorted(blobs) == sorted(np.asarray([i, i], dtype="<f4").tobytes() for i in range(3))

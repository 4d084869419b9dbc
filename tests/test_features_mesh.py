"""The feature service in the mesh, through Envoy with keys: apply a
definition, push rows and read them online; the FEATURES scope decides."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pandas as pd
from google.protobuf import struct_pb2, timestamp_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh.gateway.v1 import gateway_pb2, key_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh_chassis.testing import expect_error
from mlmesh_sdk.channel import mesh_channel

DEFINITIONS = textwrap.dedent(
    """\
    entities:
      - {name: mesh_user, join_key: user_id, value_type: int64}
    sources:
      - name: mesh_clicks
        path: {path}
        timestamp_field: event_time
        columns: {user_id: int64, clicks: int64}
    feature_views:
      - name: mesh_user_clicks
        entities: [mesh_user]
        source: mesh_clicks
        features:
          - {name: clicks, type: int64, expression: clicks}
          - {name: heavy, type: bool, expression: "clicks >= 10"}
    feature_services:
      - {name: mesh_ranker, features: [mesh_user_clicks]}
    """
)


async def test_apply_push_and_read_through_envoy(full_mesh, tmp_path):
    data = tmp_path / "clicks.parquet"
    pd.DataFrame(
        {"user_id": [1], "event_time": [pd.Timestamp.now(tz="UTC")], "clicks": [3]}
    ).to_parquet(data)
    source = DEFINITIONS.replace("{path}", str(data))
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        features = features_service_pb2_grpc.FeatureServiceStub(channel)
        applied = await features.ApplyFeatureDefinitions(
            rpc.ApplyFeatureDefinitionsRequest(source=source, source_name="mesh.yaml")
        )
        assert applied.revision >= 1
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        await features.Push(
            rpc.PushRequest(
                feature_view="mesh_user_clicks",
                rows=[
                    rpc.PushRow(
                        values={
                            "user_id": struct_pb2.Value(number_value=7),
                            "clicks": struct_pb2.Value(number_value=12),
                            "heavy": struct_pb2.Value(bool_value=True),
                        },
                        event_time=now,
                    )
                ],
            )
        )
        read = await features.GetOnlineFeatures(
            rpc.GetOnlineFeaturesRequest(
                feature_service="mesh_ranker",
                entity_rows=[
                    pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=u)})
                    for u in (7, 8)
                ],
            )
        )
        assert list(read.feature_names) == ["clicks", "heavy"]
        assert [v.value.number_value for v in read.rows[0].values[:1]] == [12]
        assert read.rows[1].values[0].status == pb.FEATURE_STATUS_NOT_FOUND
        # A bad definition through Envoy: BadRequest on its path.
        details = await expect_error(
            features.ApplyFeatureDefinitions(
                rpc.ApplyFeatureDefinitionsRequest(
                    source=source.replace("expression: clicks}", "expression: clickz}")
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert (
            details.bad_request.field_violations[0].field
            == "feature_views[0].features[0].expression"
        )
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        other = await keys.CreateKey(
            keys_rpc.CreateKeyRequest(
                key=gateway_pb2.Key(
                    display_name="registry only",
                    scopes=gateway_pb2.KeyScopes(services=[gateway_pb2.PLATFORM_SERVICE_REGISTRY]),
                )
            )
        )
    async with mesh_channel(full_mesh.address, other.secret) as channel:
        features = features_service_pb2_grpc.FeatureServiceStub(channel)
        details = await expect_error(
            features.ListFeatureViews(rpc.ListFeatureViewsRequest()),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert details.error_info.metadata["service"] == "FEATURES"


async def test_the_demo_features_are_served_by_service_and_from_the_command_line(full_mesh):
    """`make run` applied and materialized the demo repository before the
    service started (its prepare step)."""
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        features = features_service_pb2_grpc.FeatureServiceStub(channel)
        read = await features.GetOnlineFeatures(
            rpc.GetOnlineFeaturesRequest(
                feature_service="fraud_model",
                entity_rows=[
                    pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=u)})
                    for u in range(1, 21)
                ],
            )
        )
    names = list(read.feature_names)
    assert names[:2] == ["purchases_1h", "spend_24h"] and names[-1] == "big_spender"
    spend = [row.values[names.index("spend_24h")] for row in read.rows]
    # 5000 purchases over 3 days for 200 users: most have some in the last day
    present = [v for v in spend if v.status == pb.FEATURE_STATUS_PRESENT]
    assert len(present) >= 10 and all(v.value.number_value > 0 for v in present)
    cli = Path(sys.executable).with_name("mlmesh")
    shown = subprocess.run(
        [str(cli), "--target", full_mesh.address, "features", "get", "fraud_model", "user_id=1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MLMESH_API_KEY": full_mesh.api_key},
    )
    assert shown.returncode == 0, shown.stderr
    assert "spend_24h=" in shown.stdout and "big_spender=" in shown.stdout


async def test_ingested_events_are_served_from_the_flink_stream_through_envoy(full_mesh):
    """The streaming path end to end on the runner's standalone Flink cluster:
    IngestEvents through Envoy appends to the event log, the Flink job computes
    the demo's `user_activity` windows, the features service loads them, and
    GetOnlineFeatures serves them. The tests' mesh runs no demo streamer: the
    call's last event, another user's 15 s later, moves the watermark past the
    test user's window (in the same call, so in the same file, read in order:
    events in a later file could be read first and make these late)."""
    user = 700_000 + random.randrange(100_000)
    start = datetime.now(UTC)
    visits = [(user, "home", 0.0), (user, "cart", 0.001), (user, "cart", 0.002)]
    visits.append((user + 1, "home", 15.0))  # closes the test user's window
    events = []
    for who, page, after_s in visits:
        when = timestamp_pb2.Timestamp()
        when.FromDatetime(start + timedelta(seconds=after_s))
        events.append(
            pb.Event(
                values={
                    "user_id": struct_pb2.Value(number_value=who),
                    "page": struct_pb2.Value(string_value=page),
                    "dwell_s": struct_pb2.Value(number_value=1.5),
                },
                event_time=when,
            )
        )
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        features = features_service_pb2_grpc.FeatureServiceStub(channel)
        accepted = await features.IngestEvents(
            rpc.IngestEventsRequest(source="page_views", events=events)
        )
        assert accepted.accepted_events == 4
        # A column the source lacks: refused whole, through Envoy.
        bad = pb.Event(values={**events[0].values}, event_time=events[0].event_time)
        bad.values["pagez"].string_value = "x"
        details = await expect_error(
            features.IngestEvents(rpc.IngestEventsRequest(source="page_views", events=[bad])),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details.bad_request.field_violations[0].field.startswith("events[0].values")
        request = rpc.GetOnlineFeaturesRequest(
            feature_service="activity_model",
            entity_rows=[pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=user)})],
        )
        # The 10 s window closes once an event passes its end plus the
        # watermark delay; then a checkpoint commits it and the loader writes it.
        deadline = time.monotonic() + 120
        while True:
            read = await features.GetOnlineFeatures(request)
            values = dict(zip(read.feature_names, read.rows[0].values, strict=True))
            if values["views_1m"].status == pb.FEATURE_STATUS_PRESENT:
                break
            assert time.monotonic() < deadline, "the streamed window never reached the store"
            await asyncio.sleep(0.5)
    # The watermark stops 2 s behind the closing event: only windows ending
    # by then have fired, and each holds the three visits.
    window_end = values["views_1m"].event_time.ToDatetime(tzinfo=UTC)
    assert start < window_end <= start + timedelta(seconds=13)
    assert values["views_1m"].value.number_value == 3
    assert values["pages_10m"].value.number_value == 2
    assert values["dwell_10m"].value.number_value == 4.5
    assert values["last_page"].value.string_value == "cart"

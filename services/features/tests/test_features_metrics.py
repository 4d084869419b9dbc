"""The feature store's SLO figures on /metrics: online read latency per view
and the newest event time written per view (freshness), which never moves
back when older rows arrive."""

from __future__ import annotations

import grpc
import pytest
from features_fixtures import private_online_store, service_settings
from google.protobuf import struct_pb2, timestamp_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh_chassis.metrics import REGISTRY
from mlmesh_chassis.testing import keyed_channel
from mlmesh_features import telemetry
from mlmesh_features.server import build_server


@pytest.fixture
async def stub(repo, tmp_path):
    store, source, _frame = repo
    online, _ = private_online_store("sqlite", tmp_path)
    settings, secret = service_settings(tmp_path, root=store.root, online_store=online)
    host = await build_server(settings)
    async with keyed_channel(f"127.0.0.1:{host.port}", secret) as channel:
        client = features_service_pb2_grpc.FeatureServiceStub(channel)
        await client.ApplyFeatureDefinitions(
            rpc.ApplyFeatureDefinitionsRequest(source=source, source_name="repo.yaml")
        )
        yield client
    await host.shutdown()


def _push(seconds: int) -> rpc.PushRequest:
    when = timestamp_pb2.Timestamp(seconds=seconds)
    values = {
        "user_id": struct_pb2.Value(number_value=1),
        "doubled": struct_pb2.Value(number_value=2.0),
        "big": struct_pb2.Value(bool_value=False),
    }
    return rpc.PushRequest(
        feature_view="user_purchases", rows=[rpc.PushRow(values=values, event_time=when)]
    )


def _newest() -> float | None:
    return REGISTRY.get_sample_value(
        "mlmesh_features_newest_event_timestamp_seconds",
        {"view": "user_purchases", "source_kind": "stream"},
    )


def _reads() -> float:
    count = REGISTRY.get_sample_value(
        "mlmesh_features_online_read_seconds_count", {"view": "user_purchases"}
    )
    return count or 0.0


async def test_reads_are_timed_and_freshness_follows_the_newest_write(stub):
    # Freshness is per process and view: earlier tests' stores pushed to a
    # view of the same name (maybe newer rows), so start this one afresh.
    telemetry._newest.clear()
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    await stub.Push(_push(now.seconds - 60))
    assert _newest() is not None and _newest() >= now.seconds - 60
    await stub.Push(_push(now.seconds - 5))
    assert _newest() == now.seconds - 5
    await stub.Push(_push(now.seconds - 3600))  # older rows: freshness stays
    assert _newest() == now.seconds - 5
    step = {"view": "user_purchases"}
    assert REGISTRY.get_sample_value("mlmesh_features_view_step_seconds", step) == 0

    before = _reads()
    read = await stub.GetOnlineFeatures(
        rpc.GetOnlineFeaturesRequest(
            features=rpc.FeatureReferences(references=["user_purchases:doubled"]),
            entity_rows=[pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=1)})],
        )
    )
    assert read.rows[0].values[0].status == pb.FEATURE_STATUS_PRESENT
    assert _reads() == before + 1
    with pytest.raises(grpc.aio.AioRpcError):  # refused before any read: not timed
        await stub.GetOnlineFeatures(
            rpc.GetOnlineFeaturesRequest(
                features=rpc.FeatureReferences(references=["user_purchases:nope"]),
                entity_rows=[pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=1)})],
            )
        )
    assert _reads() == before + 1

"""Feast's SQL registry on the machine's PostgreSQL (127.0.0.1:5432, a fresh
database per test): the service applies definitions into it, a fresh
FeatureStore on another root reads Feast's objects back from it, and a
pushed row is served."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from features_fixtures import GOOD, service_settings
from google.protobuf import struct_pb2, timestamp_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh_chassis.testing import fresh_postgres_database, keyed_channel
from mlmesh_features.server import build_server
from mlmesh_features.store import FeatureStore

pytestmark = pytest.mark.postgres


@pytest.fixture
def postgres_url():
    try:
        with fresh_postgres_database("mlmesh_features") as url:
            yield url
    except RuntimeError as error:
        pytest.fail(str(error))


async def test_definitions_live_in_the_sql_registry_on_postgres(postgres_url, tmp_path):
    assert postgres_url.startswith("postgresql+psycopg://")
    settings, secret = service_settings(
        tmp_path,
        root=tmp_path / "store",
        registry=postgres_url,
        store_timeout_seconds=5.0,
    )
    host = await build_server(settings)
    try:
        async with keyed_channel(f"127.0.0.1:{host.port}", secret) as channel:
            stub = features_service_pb2_grpc.FeatureServiceStub(channel)
            applied = await stub.ApplyFeatureDefinitions(
                rpc.ApplyFeatureDefinitionsRequest(source=GOOD, source_name="repo.yaml")
            )
            assert applied.revision == 1
            now = timestamp_pb2.Timestamp()
            now.GetCurrentTime()
            await stub.Push(
                rpc.PushRequest(
                    feature_view="user_purchases",
                    rows=[
                        rpc.PushRow(
                            values={
                                "user_id": struct_pb2.Value(number_value=3),
                                "doubled": struct_pb2.Value(number_value=12.5),
                                "big": struct_pb2.Value(bool_value=False),
                            },
                            event_time=now,
                        )
                    ],
                )
            )
            read = await stub.GetOnlineFeatures(
                rpc.GetOnlineFeaturesRequest(
                    feature_service="fraud_model",
                    entity_rows=[
                        pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=3)})
                    ],
                )
            )
            spend, doubled, big = read.rows[0].values
            assert spend.status == pb.FEATURE_STATUS_NOT_FOUND
            assert doubled.status == pb.FEATURE_STATUS_PRESENT
            assert doubled.value.number_value == 12.5 and doubled.event_time.seconds == now.seconds
            assert big.status == pb.FEATURE_STATUS_PRESENT and not big.value.bool_value
    finally:
        await host.shutdown()

    # Another root: nothing of the first but PostgreSQL.
    fresh = FeatureStore(tmp_path / "elsewhere", registry=postgres_url)

    def read_back() -> tuple[dict, list]:
        feast = fresh.feast()
        return {v.name: v for v in feast.list_feature_views()}, feast.list_feature_services()

    views, services = await asyncio.to_thread(read_back)
    await fresh.close()
    assert set(views) == {"user_purchases", "user_spend"}
    assert [f.name for f in views["user_purchases"].features] == ["doubled", "big"]
    assert views["user_purchases"].ttl == timedelta(days=2)
    assert [s.name for s in services] == ["fraud_model"]

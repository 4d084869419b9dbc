"""The feature service over gRPC, on real Feast (SQLite online store, and
Redis): apply with its diff and dry run, bad definitions refused with
violations and nothing applied, online reads with statuses, push, lists,
bad requests, and Redis going away."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from features_fixtures import private_online_store, service_settings
from google.protobuf import struct_pb2, timestamp_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh_chassis.testing import expect_error, keyed_channel
from mlmesh_features.server import build_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(params=["sqlite", "redis"])
async def service(request, repo, tmp_path):
    store, source, frame = repo
    online, redis = private_online_store(request.param, tmp_path)
    settings, secret = service_settings(
        tmp_path,
        root=store.root,
        online_store=online,
        store_timeout_seconds=5.0,
    )
    host = await build_server(settings)
    async with keyed_channel(f"127.0.0.1:{host.port}", secret) as channel:
        yield features_service_pb2_grpc.FeatureServiceStub(channel), source, frame, redis
    await host.shutdown()
    if redis is not None:
        redis.stop()


def _apply(source: str, **fields) -> rpc.ApplyFeatureDefinitionsRequest:
    return rpc.ApplyFeatureDefinitionsRequest(source=source, source_name="repo.yaml", **fields)


def _rows(*users) -> list[pb.EntityRow]:
    return [pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=u)}) for u in users]


async def test_apply_reports_its_changes_and_bad_definitions_apply_nothing(service):
    stub, source, _, _ = service
    dry = await stub.ApplyFeatureDefinitions(_apply(source, validate_only=True))
    assert dry.revision == 0
    assert {c.action for c in dry.changes} == {pb.CHANGE_ACTION_CREATED}
    listed = await stub.ListFeatureViews(rpc.ListFeatureViewsRequest())
    assert list(listed.feature_views) == []
    bad = source.replace('expression: "amount * 2"', 'expression: "amout * 2"')
    details = await expect_error(stub.ApplyFeatureDefinitions(_apply(bad)), INVALID)
    violation = details.bad_request.field_violations[0]
    assert violation.field == "feature_views[0].features[0].expression"
    assert "unknown column 'amout'" in violation.description
    assert (await stub.ListFeatureViews(rpc.ListFeatureViewsRequest())).feature_views == []
    applied = await stub.ApplyFeatureDefinitions(_apply(source))
    assert applied.revision == 1
    listed = await stub.ListFeatureViews(rpc.ListFeatureViewsRequest(page_size=1))
    assert [v.name for v in listed.feature_views] == ["user_purchases"] and listed.next_page_token
    rest = await stub.ListFeatureViews(
        rpc.ListFeatureViewsRequest(page_token=listed.next_page_token)
    )
    assert [v.name for v in rest.feature_views] == ["user_spend"]
    assert rest.feature_views[0].source_kind == pb.SOURCE_KIND_STREAM


async def test_online_reads_push_and_statuses(service):
    stub, source, _, _ = service
    await stub.ApplyFeatureDefinitions(_apply(source))
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    pushed = await stub.Push(
        rpc.PushRequest(
            feature_view="user_purchases",
            rows=[
                rpc.PushRow(
                    values={
                        "user_id": struct_pb2.Value(number_value=1),
                        "doubled": struct_pb2.Value(number_value=250.5),
                        "big": struct_pb2.Value(bool_value=True),
                    },
                    event_time=now,
                )
            ],
        )
    )
    assert pushed.written_rows == 1
    read = await stub.GetOnlineFeatures(
        rpc.GetOnlineFeaturesRequest(
            features=rpc.FeatureReferences(
                references=["user_purchases:doubled", "user_purchases:big"]
            ),
            entity_rows=_rows(1, 404),
            full_feature_names=True,
        )
    )
    assert list(read.feature_names) == ["user_purchases__doubled", "user_purchases__big"]
    first, missing = read.rows
    assert first.values[0].status == pb.FEATURE_STATUS_PRESENT
    assert first.values[0].value.number_value == 250.5 and first.values[1].value.bool_value
    assert first.values[0].event_time.seconds == now.seconds
    assert [v.status for v in missing.values] == [pb.FEATURE_STATUS_NOT_FOUND] * 2
    by_service = await stub.GetOnlineFeatures(
        rpc.GetOnlineFeaturesRequest(feature_service="fraud_model", entity_rows=_rows(1))
    )
    assert list(by_service.feature_names) == ["spend_1d", "doubled", "big"]
    assert by_service.rows[0].values[0].status == pb.FEATURE_STATUS_NOT_FOUND  # not materialized


async def test_bad_reads_and_pushes_name_their_fields(service):
    stub, source, _, _ = service
    await stub.ApplyFeatureDefinitions(_apply(source))
    details = await expect_error(
        stub.GetOnlineFeatures(
            rpc.GetOnlineFeaturesRequest(
                features=rpc.FeatureReferences(references=["user_purchases:nope", "ghost:x"]),
                entity_rows=_rows(1),
            )
        ),
        INVALID,
    )
    fields = [v.field for v in details.bad_request.field_violations]
    assert fields == ["features.references[0]", "features.references[1]"]
    await expect_error(
        stub.GetOnlineFeatures(
            rpc.GetOnlineFeaturesRequest(feature_service="ghost", entity_rows=_rows(1))
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    wrong = [pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=1.5)})]
    details = await expect_error(
        stub.GetOnlineFeatures(
            rpc.GetOnlineFeaturesRequest(feature_service="fraud_model", entity_rows=wrong)
        ),
        INVALID,
    )
    assert details.bad_request.field_violations[0].field == "entity_rows[0].join_keys.user_id"
    # 10,000 entities: refused by the contract (1000 per call)
    details = await expect_error(
        stub.GetOnlineFeatures(
            rpc.GetOnlineFeaturesRequest(
                feature_service="fraud_model", entity_rows=_rows(*range(10_000))
            )
        ),
        INVALID,
    )
    assert details.bad_request.field_violations[0].field == "entity_rows"
    details = await expect_error(
        stub.Push(
            rpc.PushRequest(
                feature_view="user_purchases",
                rows=[
                    rpc.PushRow(
                        values={"user_id": struct_pb2.Value(string_value="x")},
                        event_time=timestamp_pb2.Timestamp(seconds=1),
                    )
                ],
            )
        ),
        INVALID,
    )
    assert {v.field for v in details.bad_request.field_violations} == {
        "rows[0].values.user_id",
        "rows[0].values.doubled",
        "rows[0].values.big",
    }


@pytest.mark.parametrize("service", ["redis"], indirect=True)
async def test_redis_down_is_unavailable_with_retry_info_and_recovers(service):
    stub, source, _, redis = service
    await stub.ApplyFeatureDefinitions(_apply(source))
    read = rpc.GetOnlineFeaturesRequest(feature_service="fraud_model", entity_rows=_rows(1))
    await stub.GetOnlineFeatures(read)
    redis.stop()
    details = await expect_error(stub.GetOnlineFeatures(read), grpc.StatusCode.UNAVAILABLE)
    assert details.retry_info.retry_delay.ToNanoseconds() > 0
    redis.start()  # the same port: the service recovers without a restart
    async with asyncio.timeout(10):
        while True:
            try:
                await stub.GetOnlineFeatures(read)
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.2)

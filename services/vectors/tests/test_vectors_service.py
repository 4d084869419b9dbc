"""The vector service over gRPC, in process, on both engines (Qdrant's
embedded engine, and qdrant-client's local mode standing in for a cluster):
collections, points, search, bad input refused with details and nothing
written, policies; and on the embedded engine, snapshots and a read replica
that follows the primary."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_VECTORS
from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh.vectors.v1 import vectors_service_pb2 as rpc
from mlmesh.vectors.v1 import vectors_service_pb2_grpc
from mlmesh_chassis.testing import bootstrap_keys_file, expect_error, keyed_channel
from mlmesh_vectors.config import VectorsSettings
from mlmesh_vectors.engine.base import Hit
from mlmesh_vectors.policies import DecisionLog, decide
from mlmesh_vectors.server import build_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DIM = 8


def settings_for(tmp_path: Path, **settings: Any) -> tuple[VectorsSettings, str]:
    keys, secret = bootstrap_keys_file(tmp_path, [PLATFORM_SERVICE_VECTORS])
    defaults: dict[str, Any] = {
        "port": 0,
        "metrics_port": -1,
        "drain_seconds": 0.0,
        "grace_seconds": 1.0,
        "bootstrap_keys_file": keys,
        "root": tmp_path / "vectors",
    }
    return VectorsSettings(**(defaults | settings)), secret


class Running:
    def __init__(self, host: Any, channel: grpc.aio.Channel) -> None:
        self.host = host
        self.channel = channel
        self.stub = vectors_service_pb2_grpc.VectorServiceStub(channel)

    async def stop(self) -> None:
        await self.channel.close()
        await self.host.shutdown()


async def start(settings: VectorsSettings, secret: str) -> Running:
    host = await build_server(settings)
    channel = keyed_channel(f"127.0.0.1:{host.port}", secret)
    return Running(host, await channel.__aenter__())


@pytest.fixture(params=["edge", "qdrant-local"])
async def service(request, tmp_path):
    extra: dict[str, Any] = {}
    if request.param == "qdrant-local":
        extra = {"backend": "qdrant", "qdrant_local_path": tmp_path / "qdrant"}
    settings, secret = settings_for(tmp_path, **extra)
    running = await start(settings, secret)
    yield running.stub, request.param
    await running.stop()


def collection(name: str = "things", **fields: Any) -> pb.Collection:
    return pb.Collection(
        name=name,
        dimension=DIM,
        distance=pb.DISTANCE_COSINE,
        payload_indexes=[
            pb.PayloadIndex(key="color", type=pb.PAYLOAD_TYPE_KEYWORD),
            pb.PayloadIndex(key="size", type=pb.PAYLOAD_TYPE_INTEGER),
        ],
        **fields,
    )


def point(i: int, vector: list[float] | None = None, **payload: Any) -> pb.Point:
    rng = np.random.default_rng(i)
    struct = struct_pb2.Struct()
    struct.update({"color": ["red", "green", "blue"][i % 3], "size": i, **payload})
    values = vector if vector is not None else rng.normal(size=DIM).tolist()
    return pb.Point(id=f"p-{i}", vector=values, payload=struct)


async def create_with_points(stub, n: int = 30) -> None:
    await stub.CreateCollection(rpc.CreateCollectionRequest(collection=collection()))
    await stub.UpsertPoints(
        rpc.UpsertPointsRequest(collection="things", points=[point(i) for i in range(n)])
    )


async def count(stub, name: str = "things") -> int:
    return (await stub.CountPoints(rpc.CountPointsRequest(collection=name))).count


async def test_collections_are_created_listed_by_page_and_deleted(service):
    stub, _ = service
    for name in ("a", "b", "c"):
        made = await stub.CreateCollection(
            rpc.CreateCollectionRequest(collection=collection(name, description=f"{name}!"))
        )
        assert made.collection.name == name and made.collection.create_time.seconds > 0
    details = await expect_error(
        stub.CreateCollection(rpc.CreateCollectionRequest(collection=collection("a"))),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert details.error_info.reason == "COLLECTION_ALREADY_EXISTS"
    got = await stub.GetCollection(rpc.GetCollectionRequest(collection="b"))
    assert got.collection.description == "b!" and got.collection.dimension == DIM
    assert [i.key for i in got.collection.payload_indexes] == ["color", "size"]
    page = await stub.ListCollections(rpc.ListCollectionsRequest(page_size=2))
    assert [c.name for c in page.collections] == ["a", "b"] and page.next_page_token
    rest = await stub.ListCollections(rpc.ListCollectionsRequest(page_token=page.next_page_token))
    assert [c.name for c in rest.collections] == ["c"] and not rest.next_page_token
    assert (await stub.DeleteCollection(rpc.DeleteCollectionRequest(collection="b"))).deleted
    assert not (await stub.DeleteCollection(rpc.DeleteCollectionRequest(collection="b"))).deleted
    details = await expect_error(
        stub.GetCollection(rpc.GetCollectionRequest(collection="b")), NOT_FOUND
    )
    assert details.error_info.reason == "COLLECTION_NOT_FOUND"
    # Names are checked in full: a trailing newline is not a name.
    await expect_error(stub.GetCollection(rpc.GetCollectionRequest(collection="a\n")), INVALID)


async def test_upsert_is_idempotent_and_points_are_read_back(service):
    stub, _ = service
    await create_with_points(stub, 10)
    again = await stub.UpsertPoints(
        rpc.UpsertPointsRequest(collection="things", points=[point(i) for i in range(10)])
    )
    assert again.upserted_count == 10 and await count(stub) == 10
    replaced = point(3, color="black")
    await stub.UpsertPoints(rpc.UpsertPointsRequest(collection="things", points=[replaced]))
    got = await stub.GetPoints(
        rpc.GetPointsRequest(
            collection="things", ids=["p-3", "missing", "p-1"], with_payload=True, with_vector=True
        )
    )
    assert [p.id for p in got.points] == ["p-3", "p-1"]
    assert got.points[0].payload["color"] == "black"
    assert "_id" not in got.points[0].payload
    assert np.allclose(list(got.points[0].vector), list(replaced.vector), atol=1e-5) or (
        # cosine collections may store normalized vectors
        np.allclose(
            np.asarray(got.points[0].vector),
            np.asarray(replaced.vector) / np.linalg.norm(replaced.vector),
            atol=1e-5,
        )
    )


async def test_search_filters_thresholds_batches_and_recommend(service):
    stub, _ = service
    await create_with_points(stub, 30)
    query = list(point(7).vector)
    hits = await stub.Search(rpc.SearchRequest(collection="things", vector=query, top_k=5))
    assert hits.points[0].id == "p-7" and len(hits.points) == 5
    assert hits.points[0].score == pytest.approx(1.0, abs=1e-4)
    assert not hits.points[0].HasField("payload") and not hits.points[0].vector
    red = pb.Filter(must=[pb.Condition(key="color", equals=struct_pb2.Value(string_value="red"))])
    filtered = await stub.Search(
        rpc.SearchRequest(
            collection="things", vector=query, top_k=30, filter=red, with_payload=True
        )
    )
    assert filtered.points and all(p.payload["color"] == "red" for p in filtered.points)
    assert len(filtered.points) == 10
    sizes = pb.ValueList(values=[struct_pb2.Value(number_value=v) for v in (1, 2, 3)])
    ranged = pb.Filter(
        must=[pb.Condition(key="size", any_of=sizes)],
        must_not=[pb.Condition(key="size", range=pb.Range(gte=3))],
    )
    some = await stub.Search(
        rpc.SearchRequest(collection="things", vector=query, top_k=30, filter=ranged)
    )
    assert sorted(p.id for p in some.points) == ["p-1", "p-2"]
    near = await stub.Search(
        rpc.SearchRequest(collection="things", vector=query, top_k=30, score_threshold=0.999)
    )
    assert [p.id for p in near.points] == ["p-7"]
    batch = await stub.SearchBatch(
        rpc.SearchBatchRequest(
            collection="things",
            queries=[rpc.BatchQuery(vector=list(point(i).vector), top_k=1) for i in (1, 2, 3)],
        )
    )
    assert [r.points[0].id for r in batch.results] == ["p-1", "p-2", "p-3"]
    like = await stub.Recommend(
        rpc.RecommendRequest(collection="things", positive_ids=["p-7"], top_k=3)
    )
    assert len(like.points) == 3 and "p-7" not in {p.id for p in like.points}
    details = await expect_error(
        stub.Recommend(rpc.RecommendRequest(collection="things", positive_ids=["nope"])),
        NOT_FOUND,
    )
    assert details.error_info.reason == "POINT_NOT_FOUND"


async def test_delete_count_and_scroll(service):
    stub, _ = service
    await create_with_points(stub, 30)
    red = pb.Filter(must=[pb.Condition(key="color", equals=struct_pb2.Value(string_value="red"))])
    assert (
        await stub.CountPoints(rpc.CountPointsRequest(collection="things", filter=red))
    ).count == 10
    by_filter = await stub.DeletePoints(rpc.DeletePointsRequest(collection="things", filter=red))
    assert by_filter.deleted_count == 10 and await count(stub) == 20
    by_id = await stub.DeletePoints(
        rpc.DeletePointsRequest(collection="things", ids=rpc.PointIds(ids=["p-1", "p-2", "nope"]))
    )
    assert by_id.deleted_count == 2 and await count(stub) == 18
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ScrollPoints(
            rpc.ScrollPointsRequest(collection="things", page_size=7, page_token=token)
        )
        seen.extend(p.id for p in page.points)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 18
    await expect_error(
        stub.ScrollPoints(rpc.ScrollPointsRequest(collection="things", page_token="x" * 300)),
        INVALID,
    )
    await expect_error(
        stub.DeletePoints(rpc.DeletePointsRequest(collection="things", filter=pb.Filter())),
        INVALID,
    )


async def test_bad_input_is_refused_with_details_and_writes_nothing(service):
    stub, _ = service
    await create_with_points(stub, 5)
    nan = point(100)
    nan.vector[3] = math.nan
    cases = [
        ([point(50), point(51, vector=[1.0] * (DIM + 1))], "points[1].vector"),
        ([point(50), nan], "points[1].vector"),
        ([point(50), point(50)], "points[1].id"),
        ([point(50), point(51, _secret=1)], "points[1].payload._secret"),
        ([point(50, vector=[0.0] * DIM)], "points[0].vector"),
        ([point(50, blob="x" * 70_000)], "points[0].payload"),
        ([point(50, meta={"scores": [1.0, math.inf]})], "points[0].payload.meta"),
    ]
    for points, field in cases:
        details = await expect_error(
            stub.UpsertPoints(rpc.UpsertPointsRequest(collection="things", points=points)), INVALID
        )
        assert details.bad_request.field_violations[0].field == field, field
    inf = point(60)
    inf.vector[0] = math.inf
    await expect_error(
        stub.Search(rpc.SearchRequest(collection="things", vector=list(inf.vector))), INVALID
    )
    assert await count(stub) == 5  # nothing of any bad batch was written
    too_many = [point(i) for i in range(1001)]
    details = await expect_error(
        stub.UpsertPoints(rpc.UpsertPointsRequest(collection="things", points=too_many)), INVALID
    )
    assert details.bad_request.field_violations[0].field == "points"
    await expect_error(
        stub.Search(rpc.SearchRequest(collection="things", vector=[1.0] * DIM, top_k=1001)),
        INVALID,
    )
    unindexed = pb.Filter(
        must=[pb.Condition(key="shape", equals=struct_pb2.Value(string_value="round"))]
    )
    details = await expect_error(
        stub.Search(rpc.SearchRequest(collection="things", vector=[1.0] * DIM, filter=unindexed)),
        INVALID,
    )
    assert details.bad_request.field_violations[0].field == "filter.must[0].key"
    assert "not an indexed payload field" in details.bad_request.field_violations[0].description
    wrong_type = pb.Filter(
        must=[pb.Condition(key="size", equals=struct_pb2.Value(string_value="big"))]
    )
    await expect_error(
        stub.Search(rpc.SearchRequest(collection="things", vector=[1.0] * DIM, filter=wrong_type)),
        INVALID,
    )
    details = await expect_error(
        stub.UpsertPoints(rpc.UpsertPointsRequest(collection="ghost", points=[point(1)])),
        NOT_FOUND,
    )
    assert details.error_info.reason == "COLLECTION_NOT_FOUND"
    await expect_error(
        stub.Search(rpc.SearchRequest(collection="ghost", vector=[1.0] * DIM)), NOT_FOUND
    )
    assert await count(stub) == 5
    # Texts and images need the models on Triton, which this service has not.
    await stub.CreateCollection(
        rpc.CreateCollectionRequest(
            collection=pb.Collection(name="texts", dimension=384, distance=pb.DISTANCE_COSINE)
        )
    )
    await expect_error(
        stub.SearchText(rpc.SearchTextRequest(collection="texts", text="hello")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    details = await expect_error(
        stub.SearchText(rpc.SearchTextRequest(collection="things", text="hello")), INVALID
    )
    assert "dimension 8" in details.message
    details = await expect_error(
        stub.UpsertImages(
            rpc.UpsertImagesRequest(
                collection="texts", items=[rpc.ImageItem(id="x", image=b"GIF89a....")]
            )
        ),
        INVALID,
    )
    assert details.bad_request.field_violations[0].field == "items[0].image"


async def test_policies_are_versioned(service):
    stub, _ = service
    await stub.CreateCollection(
        rpc.CreateCollectionRequest(
            collection=pb.Collection(name="refs", dimension=384, distance=pb.DISTANCE_COSINE)
        )
    )
    policy = pb.Policy(name="safety", collection="refs", threshold=0.8, violation_labels=["spam"])
    made = (await stub.CreatePolicy(rpc.CreatePolicyRequest(policy=policy))).policy
    assert made.version == 1 and made.max_matches == 5
    details = await expect_error(
        stub.CreatePolicy(rpc.CreatePolicyRequest(policy=policy)), grpc.StatusCode.ALREADY_EXISTS
    )
    assert details.error_info.reason == "POLICY_ALREADY_EXISTS"
    policy.threshold = 0.9
    updated = (await stub.UpdatePolicy(rpc.UpdatePolicyRequest(policy=policy))).policy
    assert updated.version == 2
    newest = (await stub.GetPolicy(rpc.GetPolicyRequest(name="safety"))).policy
    first = (await stub.GetPolicy(rpc.GetPolicyRequest(name="safety", version=1))).policy
    assert (newest.version, newest.threshold) == (2, pytest.approx(0.9))
    assert (first.version, first.threshold) == (1, pytest.approx(0.8))
    listed = await stub.ListPolicies(rpc.ListPoliciesRequest())
    assert [(p.name, p.version) for p in listed.policies] == [("safety", 2)]
    details = await expect_error(
        stub.GetPolicy(rpc.GetPolicyRequest(name="safety", version=3)), NOT_FOUND
    )
    assert details.error_info.reason == "POLICY_NOT_FOUND"
    # The reference set must exist and be compared by cosine.
    await expect_error(
        stub.CreatePolicy(
            rpc.CreatePolicyRequest(policy=pb.Policy(name="other", collection="ghost"))
        ),
        NOT_FOUND,
    )
    # Reserved collections are not the caller's to see or touch.
    assert not (await stub.ListCollections(rpc.ListCollectionsRequest())).collections[1:]
    await expect_error(
        stub.GetCollection(rpc.GetCollectionRequest(collection="_policies")), INVALID
    )


def test_decisions_follow_the_policy():
    policy = pb.Policy(threshold=0.8, violation_labels=["spam"], review_margin=0.1)

    def hit(score: float, label: str) -> Hit:
        return Hit(id=f"{label}-{score}", score=score, payload={"label": label})

    violation = decide(policy, [hit(0.95, "spam"), hit(0.85, "ok")])
    assert violation.decision == pb.DECISION_VIOLATION
    assert [(e.label, round(e.score, 2)) for e in violation.evidence] == [
        ("spam", 0.95),
        ("ok", 0.85),
    ]
    assert decide(policy, [hit(0.9, "ok")]).decision == pb.DECISION_ALLOW
    review = decide(policy, [hit(0.75, "spam")])
    assert review.decision == pb.DECISION_REVIEW and review.evidence[0].label == "spam"
    assert decide(policy, []).decision == pb.DECISION_ALLOW
    no_margin = pb.Policy(threshold=0.8)
    assert decide(no_margin, [hit(0.81, "anything")]).decision == pb.DECISION_VIOLATION


def test_the_decision_log_is_bounded(tmp_path):
    log = DecisionLog(tmp_path / "decisions" / "vectors.jsonl", max_bytes=2000)
    ids = [log.record({"policy": "p", "policy_version": 3, "n": i}) for i in range(100)]
    log.close()
    files = [tmp_path / "decisions" / name for name in ("vectors.jsonl", "vectors.jsonl.1")]
    assert all(0 < f.stat().st_size <= 2000 for f in files)
    assert sorted(p.name for p in files[0].parent.iterdir()) == [f.name for f in files]
    last = json.loads(files[0].read_text().splitlines()[-1])
    assert last["decision_id"] == ids[-1] and last["policy_version"] == 3 and last["n"] == 99


async def test_snapshots_restore_an_earlier_state(tmp_path):
    settings, secret = settings_for(tmp_path)
    running = await start(settings, secret)
    stub = running.stub
    try:
        await create_with_points(stub, 10)
        snap = (await stub.CreateSnapshot(rpc.CreateSnapshotRequest(collection="things"))).snapshot
        assert snap.point_count == 10 and snap.size_bytes > 0
        await stub.DeletePoints(
            rpc.DeletePointsRequest(collection="things", ids=rpc.PointIds(ids=["p-1", "p-2"]))
        )
        assert await count(stub) == 8
        listed = await stub.ListSnapshots(rpc.ListSnapshotsRequest(collection="things"))
        assert [s.name for s in listed.snapshots] == [snap.name]
        restored = await stub.RestoreSnapshot(
            rpc.RestoreSnapshotRequest(collection="things", snapshot=snap.name)
        )
        assert restored.collection.point_count == 10 and await count(stub) == 10
        details = await expect_error(
            stub.RestoreSnapshot(rpc.RestoreSnapshotRequest(collection="things", snapshot="nope")),
            NOT_FOUND,
        )
        assert details.error_info.reason == "SNAPSHOT_NOT_FOUND"
        await stub.DeleteSnapshot(
            rpc.DeleteSnapshotRequest(collection="things", snapshot=snap.name)
        )
        assert not (
            await stub.ListSnapshots(rpc.ListSnapshotsRequest(collection="things"))
        ).snapshots
    finally:
        await running.stop()


async def test_a_read_replica_follows_the_primary(tmp_path):
    """The replica serves what the primary wrote (read-your-writes through
    write_sequence), refuses writes, and starts over when the primary does."""
    settings, secret = settings_for(tmp_path)
    primary = await start(settings, secret)
    replica_settings = settings.model_copy(update={"instance": "vectors.1"})
    replica = await start(replica_settings, secret)
    try:
        await primary.stub.CreateCollection(rpc.CreateCollectionRequest(collection=collection()))
        written = await primary.stub.UpsertPoints(
            rpc.UpsertPointsRequest(collection="things", points=[point(i) for i in range(20)])
        )
        assert written.write_sequence > 0
        counted = await replica.stub.CountPoints(
            rpc.CountPointsRequest(collection="things", min_write_sequence=written.write_sequence)
        )
        assert counted.count == 20
        hits = await replica.stub.Search(
            rpc.SearchRequest(
                collection="things",
                vector=list(point(4).vector),
                top_k=1,
                min_write_sequence=written.write_sequence,
            )
        )
        assert hits.points[0].id == "p-4"
        deleted = await primary.stub.DeletePoints(
            rpc.DeletePointsRequest(collection="things", ids=rpc.PointIds(ids=["p-4"]))
        )
        counted = await replica.stub.CountPoints(
            rpc.CountPointsRequest(collection="things", min_write_sequence=deleted.write_sequence)
        )
        assert counted.count == 19
        await expect_error(
            replica.stub.UpsertPoints(
                rpc.UpsertPointsRequest(collection="things", points=[point(1)])
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        # A write number nobody made yet: the replica waits, then says so.
        await expect_error(
            replica.stub.CountPoints(
                rpc.CountPointsRequest(collection="things", min_write_sequence=10**9),
                timeout=1.5,
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
        # The primary restarts: a new epoch; the replica starts again from
        # its bases and keeps following.
        await primary.stop()
        primary = await start(settings, secret)
        more = await primary.stub.UpsertPoints(
            rpc.UpsertPointsRequest(collection="things", points=[point(i) for i in range(20, 25)])
        )
        assert more.write_sequence > deleted.write_sequence
        counted = await replica.stub.CountPoints(
            rpc.CountPointsRequest(collection="things", min_write_sequence=more.write_sequence)
        )
        assert counted.count == 24
    finally:
        await replica.stop()
        await primary.stop()


async def test_search_during_writes_never_fails(tmp_path):
    """Reads run while writes apply, on engine threads, not the event loop."""
    settings, secret = settings_for(tmp_path)
    running = await start(settings, secret)
    stub = running.stub
    try:
        await create_with_points(stub, 10)

        async def writer() -> None:
            for start_at in range(10, 400, 50):
                await stub.UpsertPoints(
                    rpc.UpsertPointsRequest(
                        collection="things",
                        points=[point(i) for i in range(start_at, start_at + 50)],
                    )
                )

        async def reader() -> int:
            done = 0
            while not writing.done():
                await stub.Search(rpc.SearchRequest(collection="things", vector=[1.0] * DIM))
                done += 1
            return done

        writing = asyncio.ensure_future(writer())
        reads = await asyncio.gather(reader(), reader())
        await writing
        assert sum(reads) > 0 and await count(stub) == 410
    finally:
        await running.stop()

"""The vector service in the mesh, through Envoy with keys: the demo `make
run` seeds (texts and digit images embedded by the models on Triton, one
space), text and image search, content checks with versioned policies,
metering in the gateway's ledger, and the VECTORS scope."""

from __future__ import annotations

import asyncio
import time

import grpc
from google.protobuf import struct_pb2
from meshkit import usage_buckets
from mlmesh.gateway.v1 import gateway_pb2, key_service_pb2_grpc, usage_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh.vectors.v1 import vectors_service_pb2 as rpc
from mlmesh.vectors.v1 import vectors_service_pb2_grpc
from mlmesh_chassis.testing import expect_error
from mlmesh_sdk.channel import mesh_channel
from mlmesh_vectors.demo import POLICY, held_out_png


def kind(value: str) -> pb.Filter:
    return pb.Filter(must=[pb.Condition(key="kind", equals=struct_pb2.Value(string_value=value))])


async def seeded(stub, timeout_s: float = 240.0) -> None:
    """Waits for the demo (the primary seeds it once the models are on Triton)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await stub.GetPolicy(rpc.GetPolicyRequest(name=POLICY))
            return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
        await asyncio.sleep(1.0)


async def test_the_demo_answers_text_image_and_content_checks(full_mesh):
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        stub = vectors_service_pb2_grpc.VectorServiceStub(channel)
        await seeded(stub)
        # A text finds the images of its digit.
        found = await stub.SearchText(
            rpc.SearchTextRequest(
                collection="demo",
                text="a handwritten seven",
                top_k=3,
                filter=kind("image"),
                with_payload=True,
            )
        )
        digits = [p.payload["digit"] for p in found.points]
        assert digits[0] == 7 and digits.count(7) >= 2, digits
        # An image finds the text of its digit, among the texts.
        found = await stub.SearchImage(
            rpc.SearchImageRequest(
                collection="demo",
                image=held_out_png(3, nth=5),
                top_k=1,
                filter=kind("text"),
                with_payload=True,
            )
        )
        assert found.points[0].payload["text"] == "the number three written by hand"
        # Content checks: spam text and an image of a six violate; a one is fine.
        spam = await stub.CheckContent(
            rpc.CheckContentRequest(policy=POLICY, text="claim your free cash prize, click now")
        )
        assert spam.decision == pb.DECISION_VIOLATION
        assert spam.evidence[0].label == "spam" and spam.policy_version >= 1
        assert spam.decision_id and spam.model.startswith("minilm")
        six = await stub.CheckContent(
            rpc.CheckContentRequest(policy=POLICY, image=held_out_png(6, nth=4))
        )
        assert six.decision == pb.DECISION_VIOLATION and six.evidence[0].label == "banned-six"
        one = await stub.CheckContent(
            rpc.CheckContentRequest(policy=POLICY, image=held_out_png(1, nth=4))
        )
        assert one.decision == pb.DECISION_ALLOW
        # A new policy version is applied and named by the decisions after it.
        policy = (await stub.GetPolicy(rpc.GetPolicyRequest(name=POLICY))).policy
        policy.threshold = 0.999
        newer = (await stub.UpdatePolicy(rpc.UpdatePolicyRequest(policy=policy))).policy
        strict = await stub.CheckContent(
            rpc.CheckContentRequest(policy=POLICY, image=held_out_png(6, nth=4))
        )
        assert strict.policy_version == newer.version == policy.version + 1
        older = await stub.CheckContent(
            rpc.CheckContentRequest(
                policy=POLICY, policy_version=policy.version, image=held_out_png(6, nth=4)
            )
        )
        assert older.decision == pb.DECISION_VIOLATION and older.policy_version == policy.version
        # A bad image never reaches a write.
        details = await expect_error(
            stub.SearchImage(rpc.SearchImageRequest(collection="demo", image=b"not an image")),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details.bad_request.field_violations[0].field == "image"


async def test_texts_and_images_are_written_metered_and_scoped(full_mesh):
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        made = await keys.CreateKey(
            keys_rpc.CreateKeyRequest(
                key=gateway_pb2.Key(
                    display_name="vectors caller",
                    scopes=gateway_pb2.KeyScopes(services=[gateway_pb2.PLATFORM_SERVICE_VECTORS]),
                )
            )
        )
        registry_only = await keys.CreateKey(
            keys_rpc.CreateKeyRequest(
                key=gateway_pb2.Key(
                    display_name="registry only",
                    scopes=gateway_pb2.KeyScopes(services=[gateway_pb2.PLATFORM_SERVICE_REGISTRY]),
                )
            )
        )
    async with mesh_channel(full_mesh.address, made.secret) as channel:
        stub = vectors_service_pb2_grpc.VectorServiceStub(channel)
        await stub.CreateCollection(
            rpc.CreateCollectionRequest(
                collection=pb.Collection(
                    name="mesh-multimodal",
                    dimension=384,
                    distance=pb.DISTANCE_COSINE,
                    payload_indexes=[pb.PayloadIndex(key="kind", type=pb.PAYLOAD_TYPE_KEYWORD)],
                )
            )
        )
        texts = await stub.UpsertTexts(
            rpc.UpsertTextsRequest(
                collection="mesh-multimodal",
                items=[
                    rpc.TextItem(id="t-cat", text="a cat asleep in the sun"),
                    rpc.TextItem(id="t-eight", text="a handwritten eight"),
                ],
            )
        )
        images = await stub.UpsertImages(
            rpc.UpsertImagesRequest(
                collection="mesh-multimodal",
                items=[rpc.ImageItem(id=f"i-{d}", image=held_out_png(d, nth=2)) for d in range(10)],
            )
        )
        assert (texts.upserted_count, images.upserted_count) == (2, 10)
        assert images.model.startswith("digitclip")
        hits = await stub.SearchText(
            rpc.SearchTextRequest(collection="mesh-multimodal", text="the digit 8", top_k=12)
        )
        image_hits = [p.id for p in hits.points if p.id.startswith("i-")]
        assert image_hits[0] == "i-8"
        hit = await stub.SearchImage(
            rpc.SearchImageRequest(
                collection="mesh-multimodal",
                image=held_out_png(8, nth=7),
                top_k=12,
                with_payload=True,
            )
        )
        text_hits = [p for p in hit.points if p.id.startswith("t-")]
        assert text_hits[0].payload["text"] == "a handwritten eight"
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        deadline = time.monotonic() + 15
        while True:
            buckets = [
                b
                for b in await usage_buckets(usage, made.key.id)
                if b.service == gateway_pb2.PLATFORM_SERVICE_VECTORS
            ]
            # 5 calls: the create (1 request), 12 vectors written, 2 queries.
            if sum(b.request_count for b in buckets) >= 5:
                break
            assert time.monotonic() < deadline, buckets
            await asyncio.sleep(0.2)
        assert sum(b.usage.input_items for b in buckets) == 1 + 12 + 2
    async with mesh_channel(full_mesh.address, registry_only.secret) as channel:
        stub = vectors_service_pb2_grpc.VectorServiceStub(channel)
        details = await expect_error(
            stub.ListCollections(rpc.ListCollectionsRequest()), grpc.StatusCode.PERMISSION_DENIED
        )
        assert details.error_info.metadata["service"] == "VECTORS"

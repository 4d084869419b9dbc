"""The human review queue in the mesh, through Envoy with real keys: a
source submits (idempotently), reviewers race, claim and decide, a user
reports a prediction as itself, the export lands in the registry as a
dataset version with lineage; and a real shadow disagreement (an A/B
experiment on digits) reaches the queue from the gateway."""

from __future__ import annotations

import asyncio
import io
import time
import uuid

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
from google.protobuf import json_format
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_pb2 as g
from mlmesh.gateway.v1 import gateway_service_pb2 as gateway_rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, key_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh.registry.v1 import model_pb2
from mlmesh.registry.v1 import registry_service_pb2 as registry_rpc
from mlmesh.review.v1 import review_pb2 as pb
from mlmesh.review.v1 import review_service_pb2 as rpc
from mlmesh.review.v1.review_service_pb2_grpc import ReviewServiceStub
from mlmesh_chassis.errors import details_of
from mlmesh_chassis.testing import expect_error
from mlmesh_sdk.channel import mesh_channel
from mlmesh_sdk.registry import RegistryClient
from mlmesh_triton.build import build_digits, digits_training_data, train_digits

pytestmark = pytest.mark.timeout(400)
# How long a new key may take to reach the review service (the key
# directory's watch).
KEY_WAIT_S = 60.0


async def create_key(admin_channel, name: str, *scopes: int) -> keys_rpc.CreateKeyResponse:
    keys = key_service_pb2_grpc.KeyServiceStub(admin_channel)
    return await keys.CreateKey(
        keys_rpc.CreateKeyRequest(
            key=g.Key(display_name=name, scopes=g.KeyScopes(services=scopes, model_patterns=["*"]))
        )
    )


async def once_the_key_works(call, request):
    """The call's answer, retried while the new key has not reached the
    review service yet (UNAUTHENTICATED)."""
    deadline = time.monotonic() + KEY_WAIT_S
    while True:
        try:
            return await call(request)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)


def low_confidence(model: str, source_id: str, output: str) -> pb.Item:
    return pb.Item(
        source=pb.ITEM_SOURCE_LOW_CONFIDENCE,
        source_id=source_id,
        model=model,
        model_version="1",
        inputs='{"pixels": [0, 1, 2]}',
        primary_output=output,
        alternative_output="runner-up: 4",
        context={"confidence": "0.41"},
    )


async def test_submit_claim_decide_report_and_export(full_mesh, tmp_path):
    model = f"rv-{uuid.uuid4().hex[:10]}"
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as admin:
        source = await create_key(admin, "review-source", g.PLATFORM_SERVICE_REVIEW_SUBMIT)
        first = await create_key(admin, "reviewer-a", g.PLATFORM_SERVICE_REVIEW)
        second = await create_key(admin, "reviewer-b", g.PLATFORM_SERVICE_REVIEW)
        user = await create_key(admin, "model-user", g.PLATFORM_SERVICE_INFER)
    async with (
        mesh_channel(full_mesh.address, source.secret) as source_channel,
        mesh_channel(full_mesh.address, first.secret) as a_channel,
        mesh_channel(full_mesh.address, second.secret) as b_channel,
        mesh_channel(full_mesh.address, user.secret) as user_channel,
    ):
        submitter = ReviewServiceStub(source_channel)
        a, b = ReviewServiceStub(a_channel), ReviewServiceStub(b_channel)
        users = ReviewServiceStub(user_channel)
        batch = rpc.SubmitItemsRequest(
            items=[low_confidence(model, f"pred-{n}", f"label: {n}") for n in range(3)]
        )
        submitted = await once_the_key_works(submitter.SubmitItems, batch)
        assert submitted.created_count == 3
        again = await submitter.SubmitItems(batch)
        assert again.created_count == 0
        names = [i.name for i in submitted.items]
        assert [i.name for i in again.items] == names

        listed = await once_the_key_works(a.ListItems, rpc.ListItemsRequest(model=model))
        assert [i.name for i in listed.items] == names
        assert all(i.state == pb.ITEM_STATE_OPEN for i in listed.items)
        # The source may not review; a reviewer may not submit.
        await expect_error(
            submitter.ListItems(rpc.ListItemsRequest()), grpc.StatusCode.PERMISSION_DENIED
        )
        await expect_error(a.SubmitItems(batch), grpc.StatusCode.PERMISSION_DENIED)

        # Two reviewers decide the first item at once: one verdict is recorded.
        await once_the_key_works(b.GetItem, rpc.GetItemRequest(name=names[0]))
        results = await asyncio.gather(
            a.SubmitVerdict(
                rpc.SubmitVerdictRequest(
                    name=names[0], verdict=pb.VERDICT_PRIMARY_CORRECT, correct_label="0"
                )
            ),
            b.SubmitVerdict(
                rpc.SubmitVerdictRequest(
                    name=names[0], verdict=pb.VERDICT_BOTH_WRONG, correct_label="8"
                )
            ),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, rpc.SubmitVerdictResponse)]
        lost = [r for r in results if isinstance(r, grpc.RpcError)]
        assert len(won) == 1 and len(lost) == 1, results
        loss = details_of(lost[0])
        assert loss.code in (grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION)
        assert loss.error_info is not None and loss.error_info.domain == "mlmesh.review"
        stored = (await a.GetItem(rpc.GetItemRequest(name=names[0]))).item
        assert stored.reviewer_key_id == won[0].item.reviewer_key_id
        assert stored.correct_label == won[0].item.correct_label

        # A claim holds the item against the other reviewer.
        claimed = (await a.ClaimItem(rpc.ClaimItemRequest(name=names[1]))).item
        assert claimed.claim_holder == first.key.id
        held = await expect_error(
            b.ClaimItem(rpc.ClaimItemRequest(name=names[1])), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert held.error_info is not None
        assert held.error_info.metadata["claim_holder"] == first.key.id
        await a.SubmitVerdict(
            rpc.SubmitVerdictRequest(
                name=names[1], verdict=pb.VERDICT_BOTH_WRONG, correct_label="4"
            )
        )

        # A user reports a prediction: the report is the calling key's.
        report = rpc.ReportPredictionRequest(
            request_id="req-1", model=model, reason="that is a 4", suggested_label="4"
        )
        reported = (await once_the_key_works(users.ReportPrediction, report)).item
        assert reported.source == pb.ITEM_SOURCE_USER_REPORT
        assert reported.source_id == f"{user.key.id}/req-1"
        assert reported.submitter_key_id == user.key.id
        await expect_error(
            users.ListItems(rpc.ListItemsRequest()), grpc.StatusCode.PERMISSION_DENIED
        )

        exported = await a.ExportDataset(
            rpc.ExportDatasetRequest(model=model, sources=[pb.ITEM_SOURCE_LOW_CONFIDENCE])
        )
        assert exported.dataset == f"{model}-review-labels"
        assert exported.item_count == 2

    async with RegistryClient(full_mesh.address, api_key=full_mesh.api_key) as registry:
        version = (
            await registry.stub.GetModelVersion(
                registry_rpc.GetModelVersionRequest(
                    model=exported.dataset, version=exported.version
                ),
                metadata=registry.metadata,
            )
        ).model_version
        assert version.format == "parquet-dataset"
        lineage = json_format.MessageToDict(version.lineage.run_metadata)
        assert lineage["items"] == names[:2]
        assert lineage["query"]["model"] == model
        assert lineage["query"]["sources"] == ["LOW_CONFIDENCE"]
        path = tmp_path / "labels.parquet"
        await registry.download(f"{exported.dataset}/{exported.version}", path)
    rows = pq.read_table(io.BytesIO(path.read_bytes())).to_pylist()
    assert [r["item"] for r in rows] == names[:2]
    assert rows[1]["verdict"] == "BOTH_WRONG" and rows[1]["correct_label"] == "4"
    assert rows[1]["reviewer_key_id"] == first.key.id


async def every_item(queue: ReviewServiceStub, source: int) -> list[pb.Item]:
    """Every digits item from ``source``, page by page."""
    items: list[pb.Item] = []
    token = ""
    while True:
        page = await once_the_key_works(
            queue.ListItems,
            rpc.ListItemsRequest(source=source, model="digits", page_size=500, page_token=token),
        )
        items += page.items
        token = page.next_page_token
        if not token:
            return items


async def _experiment_versions(mesh) -> list[int]:
    from mlmesh.deployer.v1alpha1 import deployer_service_pb2 as deployer_rpc
    from mlmesh.deployer.v1alpha1 import deployer_service_pb2_grpc

    async with mesh_channel(mesh.address, mesh.api_key) as channel:
        stub = deployer_service_pb2_grpc.DeployerServiceStub(channel)
        reply = await stub.ListDeployments(deployer_rpc.ListDeploymentsRequest())
    digits = next(d for d in reply.deployments if d.triton_model == "digits")
    return list(digits.experiment_versions)


async def _wait_until(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.5)


async def test_a_shadow_disagreement_reaches_the_review_queue(full_mesh, tmp_path):
    x, _ = digits_training_data()
    # The sample on which the two versions disagree most.
    gap = np.abs(train_digits(1.0).predict_proba(x) - train_digits(0.05).predict_proba(x))
    sample = x[int(gap.max(axis=1).argmax())][None]
    folder = await asyncio.to_thread(build_digits, tmp_path / "digits-review", c=0.05)
    name = f"rv-ab-{uuid.uuid4().hex[:8]}"
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as admin:
        caller = await create_key(admin, "ab-caller", g.PLATFORM_SERVICE_INFER)
        reviewer = await create_key(admin, "ab-reviewer", g.PLATFORM_SERVICE_REVIEW)
    async with RegistryClient(full_mesh.address, api_key=full_mesh.api_key) as registry:
        control = (await registry.resolve("digits@champion")).version
        treatment = (await registry.upload_folder("digits", folder, format="triton")).version
        await registry.stub.CreateExperiment(
            registry_rpc.CreateExperimentRequest(
                experiment=model_pb2.Experiment(
                    name=name,
                    model="digits",
                    # Every caller on control; every call mirrored to treatment.
                    arms=[model_pb2.ExperimentArm(name="control", version=control, weight=100)],
                    shadow=model_pb2.ShadowTraffic(version=treatment, percent=100),
                )
            ),
            metadata=registry.metadata,
        )
        try:

            async def loaded() -> bool:
                return treatment in await _experiment_versions(full_mesh)

            await _wait_until(loaded)
            # The gateway follows experiments through the registry's watch and
            # remembers whether a version is loaded for up to 1 s.
            await asyncio.sleep(1.5)
            async with (
                mesh_channel(full_mesh.address, caller.secret) as caller_channel,
                mesh_channel(full_mesh.address, reviewer.secret) as reviewer_channel,
            ):
                gateway = gateway_service_pb2_grpc.GatewayServiceStub(caller_channel)
                queue = ReviewServiceStub(reviewer_channel)
                request = gateway_rpc.InferRequest(
                    model=model_reference_pb2.ModelReference(model="digits"),
                    inputs=[
                        g.InferTensor(
                            name="pixels",
                            datatype="FP32",
                            shape=[1, 64],
                            raw_contents=sample.astype(np.float32).tobytes(),
                        )
                    ],
                )
                found: list[pb.Item] = []
                deadline = time.monotonic() + 120
                while not found:
                    assert time.monotonic() < deadline, "no shadow disagreement reached the queue"
                    reply = await once_the_key_works(gateway.Infer, request)
                    assert reply.model.version == control
                    await asyncio.sleep(0.5)  # shadows run off the callers' path
                    found = [
                        i
                        for i in await every_item(queue, pb.ITEM_SOURCE_SHADOW_DISAGREEMENT)
                        if i.context.get("experiment") == name
                    ]
            item = found[0]
            assert (item.model_version, item.alternative_version) == (str(control), str(treatment))
            assert item.context["kind"] == "infer"
            assert float(item.context["max_abs_diff"]) > 1e-3
            assert '"pixels"' in item.inputs
            assert '"probabilities"' in item.primary_output
            assert '"probabilities"' in item.alternative_output
            assert item.primary_output != item.alternative_output
        finally:
            await registry.stub.StopExperiment(
                registry_rpc.StopExperimentRequest(name=name), metadata=registry.metadata
            )

            async def unloaded() -> bool:
                return treatment not in await _experiment_versions(full_mesh)

            await _wait_until(unloaded)


async def test_a_near_threshold_content_check_reaches_the_review_queue(full_mesh):
    from mlmesh.vectors.v1 import vectors_pb2
    from mlmesh.vectors.v1 import vectors_service_pb2 as vectors_rpc
    from mlmesh.vectors.v1.vectors_service_pb2_grpc import VectorServiceStub
    from mlmesh_vectors.demo import POLICY, REFERENCES

    text = "claim your free cash prize, click now"
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as admin:
        reviewer = await create_key(admin, "content-reviewer", g.PLATFORM_SERVICE_REVIEW)
        vectors = VectorServiceStub(admin)
        deadline = time.monotonic() + 240
        while True:  # the vector service seeds its demo once the models are on Triton
            try:
                probe = await vectors.CheckContent(
                    vectors_rpc.CheckContentRequest(policy=POLICY, text=text)
                )
                break
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(1.0)
        spam = [e for e in probe.evidence if e.label == "spam"]
        assert spam, probe
        # A policy whose threshold is this text's own score: the same check
        # again lands right on it.
        name = f"rv-near-{uuid.uuid4().hex[:8]}"
        await vectors.CreatePolicy(
            vectors_rpc.CreatePolicyRequest(
                policy=vectors_pb2.Policy(
                    name=name,
                    collection=REFERENCES,
                    threshold=spam[0].score,
                    violation_labels=["spam"],
                )
            )
        )
        checked = await vectors.CheckContent(
            vectors_rpc.CheckContentRequest(policy=name, text=text)
        )
    async with mesh_channel(full_mesh.address, reviewer.secret) as channel:
        queue = ReviewServiceStub(channel)
        deadline = time.monotonic() + 60
        while True:  # submitted off the check's path
            items = []
            token = ""
            while True:
                page = await once_the_key_works(
                    queue.ListItems,
                    rpc.ListItemsRequest(
                        source=pb.ITEM_SOURCE_CONTENT_CHECK, page_size=500, page_token=token
                    ),
                )
                items += [i for i in page.items if i.source_id == checked.decision_id]
                token = page.next_page_token
                if not token:
                    break
            if items:
                break
            assert time.monotonic() < deadline, "the content check did not reach the queue"
            await asyncio.sleep(0.5)
    item = items[0]
    assert f"{item.model}/{item.model_version}" == checked.model
    assert item.inputs == text
    assert item.context["policy"] == name
    assert float(item.context["threshold"]) == pytest.approx(spam[0].score, abs=1e-5)

"""Shadow disagreements reach the review queue (a real ReviewService in this
process): inputs and both outputs, capped; agreements and repeats do not;
a queue that is down never fails the comparison or the caller."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from keyring import migrated_gateway_db
from mlmesh.registry.v1 import model_pb2
from mlmesh.review.v1 import review_pb2
from mlmesh.review.v1 import review_service_pb2 as review_rpc
from mlmesh.review.v1.review_service_pb2_grpc import ReviewServiceStub
from mlmesh_chassis.metrics import REGISTRY
from mlmesh_chassis.testing import acting_as, keyed_channel
from mlmesh_gateway.shadows import (
    ShadowComparison,
    ShadowLog,
    ShadowRunner,
    render_tensors,
    shadow_results,
)
from mlmesh_review.testing import local_review


def experiment() -> model_pb2.Experiment:
    return model_pb2.Experiment(
        name="ab",
        model="digits",
        arms=[model_pb2.ExperimentArm(name="a", version=1, weight=100)],
        shadow=model_pb2.ShadowTraffic(version=2, percent=100),
    )


class Queue:
    def __init__(self, target: str, reviewer: ReviewServiceStub) -> None:
        self.target = target
        self.reviewer = reviewer

    async def items(self) -> list[review_pb2.Item]:
        listed = await self.reviewer.ListItems(review_rpc.ListItemsRequest(model="digits"))
        return list(listed.items)


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Queue]:
    """A review service whose keys hold the gateway's service key
    (REVIEW_SUBMIT, this process's identity meanwhile) and a reviewer's."""
    async with local_review(tmp_path) as review:
        with acting_as(review.submitter_secret, tmp_path):
            async with keyed_channel(review.target, review.reviewer_secret) as channel:
                yield Queue(review.target, ReviewServiceStub(channel))


async def settle(runner: ShadowRunner, log: ShadowLog) -> None:
    await asyncio.gather(*runner._tasks)
    if log.reviews is not None:
        await log.reviews.flush()


async def test_disagreements_reach_the_review_queue(queue: Queue, tmp_path: Path) -> None:
    database = await migrated_gateway_db(f"sqlite+aiosqlite:///{tmp_path}/g.db")
    log = ShadowLog(database, queue.target)
    runner = ShadowRunner(log)
    inputs = {"image": np.arange(1000, dtype=np.float32).reshape(10, 100)}
    primary = {"label": np.array([7])}

    async def disagree() -> ShadowComparison:
        return ShadowComparison(
            0.9,
            "infer",
            render_tensors(inputs),
            render_tensors(primary),
            render_tensors({"label": np.array([1])}),
        )

    async def agree() -> ShadowComparison:
        return ShadowComparison(0.0)

    async def llm_disagree() -> ShadowComparison:
        return ShadowComparison(1.0, "generate", "x" * 20_000, "<script>alert(1)</script>", "b")

    try:
        runner.mirror("call-disagree", experiment(), "digits", (1, 2), disagree)
        runner.mirror("call-agree", experiment(), "digits", (1, 2), agree)
        runner.mirror("call-llm", experiment(), "digits", (1, 2), llm_disagree)
        await settle(runner, log)
        # The same call compared again (a replayed shadow) is not a second item.
        runner.mirror("call-disagree", experiment(), "digits", (1, 2), disagree)
        await settle(runner, log)

        items = {i.source_id: i for i in await queue.items()}
        assert sorted(items) == ["call-disagree", "call-llm"]
        item = items["call-disagree"]
        assert item.source == review_pb2.ITEM_SOURCE_SHADOW_DISAGREEMENT
        assert (item.model, item.model_version, item.alternative_version) == ("digits", "1", "2")
        assert item.request_id == "call-disagree"
        assert item.context["experiment"] == "ab"
        assert item.context["kind"] == "infer"
        assert float(item.context["max_abs_diff"]) == pytest.approx(0.9)
        shown = json.loads(item.inputs)
        assert shown["image"]["shape"] == [10, 100]
        assert shown["image"]["truncated"] is True
        assert len(shown["image"]["values"]) == 256
        assert '"values": [7]' in item.primary_output
        assert '"values": [1]' in item.alternative_output

        llm = items["call-llm"]
        assert len(llm.inputs) == 16384 and llm.inputs.endswith("…")
        assert llm.context["truncated"] == "inputs"
        assert llm.primary_output == "<script>alert(1)</script>"

        async with database.read() as c:
            rows = (await c.execute(sa.select(shadow_results.c.request_id))).all()
        assert sorted(r.request_id for r in rows) == ["call-agree", "call-disagree", "call-llm"]
    finally:
        await log.close()
        await database.close()


async def test_a_review_queue_that_is_down_fails_nothing(tmp_path: Path) -> None:
    database = await migrated_gateway_db(f"sqlite+aiosqlite:///{tmp_path}/g.db")
    # Nothing listens on port 1.
    log = ShadowLog(database, "127.0.0.1:1")
    runner = ShadowRunner(log)
    failed_before = REGISTRY.get_sample_value(
        "mlmesh_review_submissions_total", {"outcome": "failed"}
    )

    async def disagree() -> ShadowComparison:
        return ShadowComparison(0.5, "infer", "{}", "1", "2")

    try:
        runner.mirror("call-down", experiment(), "digits", (1, 2), disagree)
        await settle(runner, log)
        async with database.read() as c:
            rows = (await c.execute(sa.select(shadow_results.c.request_id))).all()
        assert [r.request_id for r in rows] == ["call-down"]
        failed_after = REGISTRY.get_sample_value(
            "mlmesh_review_submissions_total", {"outcome": "failed"}
        )
        assert (failed_after or 0) - (failed_before or 0) == 1
    finally:
        await log.close()
        await database.close()


async def test_without_a_review_queue_nothing_is_submitted(tmp_path: Path) -> None:
    database = await migrated_gateway_db(f"sqlite+aiosqlite:///{tmp_path}/g.db")
    log = ShadowLog(database)
    try:
        offered = log.submit_for_review(
            "call-x", "ab", "digits", (1, 2), ShadowComparison(1.0, "infer", "{}", "1", "2")
        )
        assert offered is False and log.reviews is None
    finally:
        await database.close()


def test_rendered_string_tensors_are_cut_before_decoding():
    # A BYTES element of a megabyte: a reviewer sees its first characters,
    # and the render never decodes (or serialises) the whole of it.
    huge = np.array([b"\xc3\xa9" * 500_000, b"short"], dtype=object)
    shown = json.loads(render_tensors({"text": huge}))["text"]
    assert shown["values"] == ["é" * 256, "short"]
    assert shown["shape"] == [2] and shown["truncated"] is False
    words = json.loads(render_tensors({"w": np.array(["x" * 10_000])}))["w"]["values"]
    assert words == ["x" * 256]

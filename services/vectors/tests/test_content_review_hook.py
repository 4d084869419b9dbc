"""Near-threshold content checks offered to the review queue (a real
ReviewService in this process): which checks are near, what the item holds,
and that a queue that is down fails nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mlmesh.review.v1 import review_pb2
from mlmesh.review.v1 import review_service_pb2 as review_rpc
from mlmesh.review.v1.review_service_pb2_grpc import ReviewServiceStub
from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh_chassis.testing import acting_as, keyed_channel
from mlmesh_review.testing import local_review
from mlmesh_sdk.review import ReviewSubmitter
from mlmesh_vectors.engine.base import Hit
from mlmesh_vectors.review_hook import ContentReviews

POLICY = pb.Policy(name="spam", version=3, threshold=0.8, violation_labels=["spam"])


def hit(score: float, label: str) -> Hit:
    return Hit(id=f"{label}-{score}", score=score, payload={"label": label})


def test_which_checks_are_near_the_threshold() -> None:
    reviews = ContentReviews(ReviewSubmitter("127.0.0.1:1"), margin=0.02)
    assert reviews.search_margin(POLICY) == 0.02
    # Just above and just below the threshold, violation-labelled: near.
    assert reviews.near(POLICY, [hit(0.81, "spam")], pb.DECISION_VIOLATION) is not None
    assert reviews.near(POLICY, [hit(0.79, "spam")], pb.DECISION_ALLOW) is not None
    # Far from it, or not a violation label: not near.
    assert reviews.near(POLICY, [hit(0.95, "spam")], pb.DECISION_VIOLATION) is None
    assert reviews.near(POLICY, [hit(0.5, "spam")], pb.DECISION_ALLOW) is None
    assert reviews.near(POLICY, [hit(0.8, "ham")], pb.DECISION_ALLOW) is None
    # The policy's own REVIEW decision always is.
    wide = pb.Policy(threshold=0.8, violation_labels=["spam"], review_margin=0.2)
    assert reviews.search_margin(wide) == pytest.approx(0.2)
    assert reviews.near(wide, [hit(0.65, "spam")], pb.DECISION_REVIEW) is not None
    # Without a review queue the search reaches no further than the policy.
    assert ContentReviews(None, 0.02).search_margin(POLICY) == 0.0


@pytest.fixture
async def reviewer(tmp_path: Path) -> AsyncIterator[tuple[str, ReviewServiceStub]]:
    """A review service whose keys hold this process's service key
    (REVIEW_SUBMIT, as the vector service's) and a reviewer's."""
    async with local_review(tmp_path) as review:
        with acting_as(review.submitter_secret, tmp_path):
            async with keyed_channel(review.target, review.reviewer_secret) as channel:
                yield review.target, ReviewServiceStub(channel)


async def test_near_checks_reach_the_review_queue(reviewer) -> None:
    target, stub = reviewer
    submitter = ReviewSubmitter(target)
    reviews = ContentReviews(submitter, margin=0.02)
    try:
        hits = [hit(0.81, "spam"), hit(0.7, "ham")]
        assert reviews.offer(
            POLICY, hits, pb.DECISION_VIOLATION, "d1", "minilm/3", "<b>buy now</b>", 0
        )
        assert reviews.offer(
            POLICY, [hit(0.79, "spam")], pb.DECISION_ALLOW, "d2", "digitclip/1", None, 5120
        )
        # Far from the threshold: not offered.
        assert not reviews.offer(
            POLICY, [hit(0.99, "spam")], pb.DECISION_VIOLATION, "d3", "minilm", "x", 0
        )
        await submitter.flush()
    finally:
        await submitter.close()
    listed = await stub.ListItems(
        review_rpc.ListItemsRequest(source=review_pb2.ITEM_SOURCE_CONTENT_CHECK)
    )
    items = {i.source_id: i for i in listed.items}
    assert sorted(items) == ["d1", "d2"]
    text = items["d1"]
    assert (text.model, text.model_version) == ("minilm", "3")
    assert text.inputs == "<b>buy now</b>"
    assert json.loads(text.primary_output)["decision"] == "VIOLATION"
    assert json.loads(text.alternative_output)["nearest"]["label"] == "spam"
    assert text.context["policy"] == "spam" and text.context["policy_version"] == "3"
    assert float(text.context["score"]) == pytest.approx(0.81)
    image = items["d2"]
    assert image.inputs == "[image, 5120 bytes]"
    assert json.loads(image.primary_output)["decision"] == "ALLOW"


async def test_a_review_queue_that_is_down_fails_nothing() -> None:
    submitter = ReviewSubmitter("127.0.0.1:1")
    reviews = ContentReviews(submitter, margin=0.02)
    try:
        assert reviews.offer(
            POLICY, [hit(0.8, "spam")], pb.DECISION_VIOLATION, "d9", "minilm", "x", 0
        )
        await submitter.flush()  # the call failed, was logged, and is done
    finally:
        await submitter.close()

"""Content checks near the policy's threshold, offered to the human review
queue (mlmesh.review.v1): a decision of REVIEW (within the policy's own
review margin), and any decision whose best violation-labelled match scored
within ``margin`` of the threshold on either side. Offering never waits
and never raises (mlmesh_sdk.review.ReviewSubmitter: bounded, batched, best
effort); the caller's answer does not depend on it."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from mlmesh.review.v1 import review_pb2
from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh_sdk.review import ReviewSubmitter, cap

from mlmesh_vectors.engine.base import Hit

_MODEL = re.compile(r"[a-z][a-z0-9-]{1,62}")
_VERSION = re.compile(r"[A-Za-z0-9._-]{0,64}")


def _label(hit: Hit) -> str:
    value = (hit.payload or {}).get("label", "")
    return value if isinstance(value, str) else str(value)


class ContentReviews:
    def __init__(self, submitter: ReviewSubmitter | None, margin: float) -> None:
        self.submitter = submitter
        self.margin = margin

    def search_margin(self, policy: pb.Policy) -> float:
        """How far below the threshold the check's search must reach."""
        return max(policy.review_margin, self.margin if self.submitter is not None else 0.0)

    def near(self, policy: pb.Policy, hits: Sequence[Hit], decision: int) -> Hit | None:
        """The violation-labelled match that makes the check worth a human
        look (None: not near the threshold)."""
        violating = [
            h for h in hits if not policy.violation_labels or _label(h) in policy.violation_labels
        ]
        if decision == pb.DECISION_REVIEW and violating:
            return violating[0]
        close = [h for h in violating if abs(h.score - policy.threshold) <= self.margin]
        return close[0] if close else None

    def offer(
        self,
        policy: pb.Policy,
        hits: Sequence[Hit],
        decision: int,
        decision_id: str,
        model: str,
        text: str | None,
        image_bytes: int,
    ) -> bool:
        """Offers the check to the review queue when it is near the threshold.
        ``model`` is the embedding model as the check names it, `name/version`."""
        name, _, version = model.partition("/")
        if self.submitter is None or not _MODEL.fullmatch(name) or not _VERSION.fullmatch(version):
            return False
        nearest = self.near(policy, hits, decision)
        if nearest is None:
            return False
        inputs = cap(text)[0] if text is not None else f"[image, {image_bytes} bytes]"
        primary = json.dumps(
            {
                "decision": pb.Decision.Name(decision).removeprefix("DECISION_"),
                "evidence": [
                    {"id": h.id, "label": _label(h), "score": round(h.score, 6)} for h in hits[:8]
                ],
            }
        )
        alternative = json.dumps(
            {
                "nearest": {
                    "id": nearest.id,
                    "label": _label(nearest),
                    "score": round(nearest.score, 6),
                }
            }
        )
        item = review_pb2.Item(
            source=review_pb2.ITEM_SOURCE_CONTENT_CHECK,
            source_id=decision_id,
            model=name,
            model_version=version,
            inputs=inputs,
            primary_output=cap(primary)[0],
            alternative_output=cap(alternative)[0],
            context={
                "policy": policy.name,
                "policy_version": str(policy.version),
                "threshold": f"{policy.threshold:.6g}",
                "review_margin": f"{policy.review_margin:.6g}",
                "near_margin": f"{self.margin:.6g}",
                "score": f"{nearest.score:.6g}",
            },
        )
        self.submitter.start()
        return self.submitter.offer(item)

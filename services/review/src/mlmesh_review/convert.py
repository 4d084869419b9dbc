"""Rows of the queue to mlmesh.review.v1 messages, and requests to drafts."""

from __future__ import annotations

import json
from typing import Any, cast

from google.protobuf import timestamp_pb2
from mlmesh.review.v1 import review_pb2 as pb

from mlmesh_review.queue import CLAIMED, Draft, effective_state, item_name

SOURCE_NAMES = {
    value: name.removeprefix("ITEM_SOURCE_")
    for name, value in pb.ItemSource.items()
    if value != pb.ITEM_SOURCE_UNSPECIFIED
}
STATE_NAMES = {
    value: name.removeprefix("ITEM_STATE_")
    for name, value in pb.ItemState.items()
    if value != pb.ITEM_STATE_UNSPECIFIED
}
SOURCE_VALUES = {name: cast(pb.ItemSource, value) for value, name in SOURCE_NAMES.items()}
STATE_VALUES = {name: cast(pb.ItemState, value) for value, name in STATE_NAMES.items()}
VERDICT_NAMES = {
    value: name.removeprefix("VERDICT_")
    for name, value in pb.Verdict.items()
    if value != pb.VERDICT_UNSPECIFIED
}


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(us)
    return stamp


def draft_of(item: pb.Item) -> Draft:
    """A submitted item (validated against the contract by the chassis)."""
    return Draft(
        source=SOURCE_NAMES[item.source],
        source_id=item.source_id,
        model=item.model,
        model_version=item.model_version,
        alternative_model=item.alternative_model,
        alternative_version=item.alternative_version,
        inputs=item.inputs,
        primary_output=item.primary_output,
        alternative_output=item.alternative_output,
        context=dict(item.context),
        request_id=item.request_id,
    )


def to_proto(row: Any, now: int) -> pb.Item:
    state = effective_state(row, now)
    item = pb.Item(
        name=item_name(row.id),
        source=SOURCE_VALUES[row.source],
        source_id=row.source_id,
        model=row.model,
        model_version=row.model_version,
        alternative_model=row.alternative_model,
        alternative_version=row.alternative_version,
        inputs=row.inputs,
        primary_output=row.primary_output,
        alternative_output=row.alternative_output,
        context=json.loads(row.context or "{}"),
        request_id=row.request_id,
        create_time=timestamp(row.create_us),
        state=STATE_VALUES[state],
        escalation_reason=row.escalation_reason,
        submitter_key_id=row.submitter,
    )
    if state == CLAIMED:
        item.claim_holder = row.claim_holder
        item.claim_expire_time.CopyFrom(timestamp(row.claim_expire_us))
    if row.verdict:
        item.verdict = VERDICT_VALUES[row.verdict]
        item.correct_label = row.correct_label
        item.note = row.note
        item.reviewer_key_id = row.reviewer
        item.decide_time.CopyFrom(timestamp(row.decide_us))
    return item


VERDICT_VALUES = {name: cast(pb.Verdict, value) for value, name in VERDICT_NAMES.items()}

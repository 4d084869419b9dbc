"""Helpers of the review service tests (a module of its own: test modules
import it, and a module named conftest would clash with the others')."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from mlmesh.gateway.v1 import gateway_pb2 as g
from mlmesh.gateway.v1 import key_directory_service_pb2 as kd
from mlmesh.review.v1 import review_pb2, review_service_pb2_grpc
from mlmesh.review.v1 import review_service_pb2 as rpc
from mlmesh_chassis.auth import ServiceIdentity, service_identity, set_service_identity
from mlmesh_chassis.errors import details_of
from mlmesh_chassis.server import ServiceHost
from mlmesh_chassis.testing import directory_key, keyed_channel
from mlmesh_review.config import ReviewSettings
from mlmesh_review.server import build_server

# The callers the tests use, and the scopes of each.
CALLERS: dict[str, list[int]] = {
    "reviewera": [g.PLATFORM_SERVICE_REVIEW],
    "reviewerb": [g.PLATFORM_SERVICE_REVIEW],
    "submitter": [g.PLATFORM_SERVICE_REVIEW_SUBMIT],
    # A user of the models: may report (its models: digits* only).
    "user": [g.PLATFORM_SERVICE_INFER],
    "otheruser": [g.PLATFORM_SERVICE_GENERATE],
    # A key with no review scope at all.
    "stranger": [g.PLATFORM_SERVICE_FEATURES],
}


ABORTED = grpc.StatusCode.ABORTED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

# Key ids are 16 hex digits.
KEY_IDS = {name: f"{n + 1:016x}" for n, name in enumerate(CALLERS)}


@dataclass
class Review:
    host: ServiceHost
    settings: ReviewSettings
    stubs: dict[str, review_service_pb2_grpc.ReviewServiceStub]
    channels: list[grpc.aio.Channel]
    previous_identity: ServiceIdentity
    key_ids: dict[str, str] = field(default_factory=dict)


def keys_file(folder: Path) -> tuple[Path, dict[str, str]]:
    """A bootstrap key directory with the CALLERS; (its path, secrets by caller)."""
    entries, secrets = [], {}
    for name, services in CALLERS.items():
        entry, secret = directory_key(services, key_id=KEY_IDS[name])
        if name == "user":
            del entry.key.scopes.model_patterns[:]
            entry.key.scopes.model_patterns.append("digits*")
        entries.append(entry)
        secrets[name] = secret
    path = folder / "review-keys.json"
    path.write_text(json_format.MessageToJson(kd.WatchKeysResponse(snapshot=True, keys=entries)))
    return path, secrets


async def start_review(
    root: Path, registry_target: str, registry_secret: str, **extra: Any
) -> Review:
    """The service in this process, with the registry's key as its own (its
    REGISTRY scope uploads the exports). The key becomes the process's
    service identity (a chassis global): ``stop_review`` puts the previous
    one back."""
    root.mkdir(parents=True, exist_ok=True)
    keys, secrets = keys_file(root)
    key_file = root / "service.key"
    key_file.write_text(registry_secret)
    defaults: dict[str, Any] = {
        "port": 0,
        "metrics_port": -1,
        "drain_seconds": 0.0,
        "grace_seconds": 1.0,
        "bootstrap_keys_file": keys,
        "service_key_file": key_file,
        "root": root / "review",
        "registry_target": registry_target,
    }
    settings = ReviewSettings(**(defaults | extra))
    previous = service_identity()
    host = await build_server(settings)
    stubs, channels = {}, []
    for name, secret in secrets.items():
        channel = keyed_channel(f"127.0.0.1:{host.port}", secret)
        channels.append(channel)
        stubs[name] = review_service_pb2_grpc.ReviewServiceStub(channel)
    return Review(host, settings, stubs, channels, previous, dict(KEY_IDS))


async def stop_review(review: Review) -> None:
    for channel in review.channels:
        await channel.close()
    await review.host.shutdown()
    set_service_identity(review.previous_identity)


def shadow_item(source_id: str, model: str = "digits", **fields: Any) -> review_pb2.Item:
    values: dict[str, Any] = {
        "source": review_pb2.ITEM_SOURCE_SHADOW_DISAGREEMENT,
        "source_id": source_id,
        "model": model,
        "model_version": "1",
        "alternative_version": "2",
        "inputs": '{"x": [1, 2, 3]}',
        "primary_output": "7",
        "alternative_output": "1",
        "context": {"max_abs_diff": "0.9"},
        "request_id": source_id,
    }
    return review_pb2.Item(**(values | fields))


async def race_verdicts(review: Review, prefix: str, rounds: int) -> collections.Counter[str]:
    """Two reviewers decide the same OPEN items at once: each item gets one
    verdict, the winner's; the loser gets ABORTED or FAILED_PRECONDITION."""
    a, b = review.stubs["reviewera"], review.stubs["reviewerb"]
    request = rpc.SubmitItemsRequest(items=[shadow_item(f"{prefix}-{n}") for n in range(rounds)])
    names = [i.name for i in (await review.stubs["submitter"].SubmitItems(request)).items]
    outcomes: collections.Counter[str] = collections.Counter()
    for name in names:
        calls = [
            stub.SubmitVerdict(
                rpc.SubmitVerdictRequest(name=name, verdict=verdict, correct_label=label)
            )
            for stub, verdict, label in (
                (a, review_pb2.VERDICT_PRIMARY_CORRECT, "from-a"),
                (b, review_pb2.VERDICT_BOTH_WRONG, "from-b"),
            )
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, grpc.RpcError)]
        assert len(won) == 1 and len(lost) == 1, results
        outcomes[details_of(lost[0]).code.name] += 1
        details = details_of(lost[0])
        assert details.code in (ABORTED, FAILED_PRECONDITION), details
        assert details.error_info is not None
        assert details.error_info.domain == "mlmesh.review"
        assert details.error_info.reason in ("CONCURRENT_MODIFICATION", "FAILED_PRECONDITION")
        winner = won[0].item
        stored = (await a.GetItem(rpc.GetItemRequest(name=name))).item
        assert stored.state == review_pb2.ITEM_STATE_DECIDED
        assert (stored.reviewer_key_id, stored.correct_label) == (
            winner.reviewer_key_id,
            winner.correct_label,
        )
        by = "a" if stored.reviewer_key_id == KEY_IDS["reviewera"] else "b"
        assert stored.correct_label == f"from-{by}"
        # The winner's retry is answered with the same record.
        winner_stub = a if winner.reviewer_key_id == KEY_IDS["reviewera"] else b
        retry = await winner_stub.SubmitVerdict(
            rpc.SubmitVerdictRequest(
                name=name, verdict=winner.verdict, correct_label=winner.correct_label
            )
        )
        assert retry.item.decide_time == winner.decide_time
    return outcomes


async def race_claims(review: Review, prefix: str, rounds: int) -> None:
    """Two reviewers claim the same OPEN items at once: one holds each."""
    a, b = review.stubs["reviewera"], review.stubs["reviewerb"]
    request = rpc.SubmitItemsRequest(items=[shadow_item(f"{prefix}-{n}") for n in range(rounds)])
    names = [i.name for i in (await review.stubs["submitter"].SubmitItems(request)).items]
    for name in names:
        results = await asyncio.gather(
            a.ClaimItem(rpc.ClaimItemRequest(name=name)),
            b.ClaimItem(rpc.ClaimItemRequest(name=name)),
            return_exceptions=True,
        )
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, grpc.RpcError)]
        assert len(won) == 1 and len(lost) == 1, results
        details = details_of(lost[0])
        assert details.code in (ABORTED, FAILED_PRECONDITION), details
        assert details.error_info is not None and details.error_info.domain == "mlmesh.review"
        stored = (await a.GetItem(rpc.GetItemRequest(name=name))).item
        assert stored.state == review_pb2.ITEM_STATE_CLAIMED
        assert stored.claim_holder == won[0].item.claim_holder

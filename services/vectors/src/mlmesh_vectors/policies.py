"""Content policies: versioned, kept in the engine itself (the reserved
collection ``_policies``, one point per version), so the embedded engine's
replicas and a Qdrant cluster's instances see the same policies with no
other store.

A policy version is immutable. CheckContent applies the newest version, or
the one asked for, and every decision names the version it applied; the
decision is appended to this instance's decision log (JSON lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format
from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh_chassis.errors import AlreadyExists, FailedPrecondition, NotFound

from mlmesh_vectors.engine.base import (
    Batch,
    CollectionSpec,
    Condition,
    Distance,
    Filter,
    Hit,
)
from mlmesh_vectors.store import VectorStore

COLLECTION = "_policies"
_SPEC = CollectionSpec(
    name=COLLECTION,
    dimension=1,
    distance=Distance.DOT,
    description="content policies, one point per version",
    payload_indexes=(("name", "keyword"),),
)
DEFAULT_MAX_MATCHES = 5
MAX_VERSIONS = 10_000


@dataclass
class Verdict:
    decision: int
    evidence: list[pb.Evidence]


def decide(policy: pb.Policy, hits: Sequence[Hit]) -> Verdict:
    """The decision for a check's nearest labelled references (scored at
    or above threshold - review_margin, best first)."""

    def label(hit: Hit) -> str:
        value = (hit.payload or {}).get("label", "")
        return value if isinstance(value, str) else str(value)

    def violating(hit: Hit) -> bool:
        return not policy.violation_labels or label(hit) in policy.violation_labels

    def evidence(hits: Sequence[Hit]) -> list[pb.Evidence]:
        return [pb.Evidence(id=h.id, label=label(h), score=h.score) for h in hits]

    crossing = [h for h in hits if h.score >= policy.threshold]
    if any(violating(h) for h in crossing):
        return Verdict(pb.DECISION_VIOLATION, evidence(crossing))
    near = [h for h in hits if h.score < policy.threshold and violating(h)]
    if near and policy.review_margin > 0:
        return Verdict(pb.DECISION_REVIEW, evidence(near))
    return Verdict(pb.DECISION_ALLOW, evidence(crossing))


class Policies:
    def __init__(self, store: VectorStore) -> None:
        self.store = store
        self._lock = asyncio.Lock()  # numbers versions one at a time

    async def _ensure_collection(self) -> None:
        with contextlib.suppress(AlreadyExists):
            await self.store.create_collection(_SPEC)

    async def _versions(self, name: str) -> list[pb.Policy]:
        only = Filter(must=(Condition("name", equals=name),))
        records, _ = await self.store.run(
            self.store.backend.scroll, COLLECTION, None, MAX_VERSIONS, only, True, False
        )
        versions = [
            json_format.ParseDict(r.payload["policy"], pb.Policy())
            for r in records
            if r.payload and "policy" in r.payload
        ]
        return sorted(versions, key=lambda p: p.version)

    async def get(self, name: str, version: int = 0) -> pb.Policy:
        try:
            versions = await self._versions(name)
        except NotFound:  # no policy was ever made
            versions = []
        if version:
            versions = [p for p in versions if p.version == version]
        if not versions:
            what = f"{name} version {version}" if version else name
            raise NotFound("policy", what, f"policy {what} not found")
        return versions[-1]

    async def list(self) -> list[pb.Policy]:
        try:
            records, _ = await self.store.run(
                self.store.backend.scroll, COLLECTION, None, MAX_VERSIONS, None, True, False
            )
        except NotFound:
            return []
        newest: dict[str, pb.Policy] = {}
        for record in records:
            policy = json_format.ParseDict((record.payload or {})["policy"], pb.Policy())
            if policy.version > newest.get(policy.name, pb.Policy()).version:
                newest[policy.name] = policy
        return [newest[name] for name in sorted(newest)]

    async def put(self, policy: pb.Policy, *, create: bool) -> tuple[int, pb.Policy]:
        """Creates version 1, or the next version; the reference collection
        must exist with cosine distance."""
        spec = await self.store.spec(policy.collection)
        if spec.distance is not Distance.COSINE:
            raise FailedPrecondition(
                f"policy {policy.name}: collection {policy.collection} must use cosine distance",
                collection=policy.collection,
            )
        async with self._lock:
            await self._ensure_collection()
            try:
                versions = await self._versions(policy.name)
            except NotFound:
                versions = []
            if create and versions:
                raise AlreadyExists("policy", policy.name)
            if not create and not versions:
                raise NotFound("policy", policy.name, f"policy {policy.name} not found")
            made = pb.Policy()
            made.CopyFrom(policy)
            made.version = versions[-1].version + 1 if versions else 1
            if not made.max_matches:
                made.max_matches = DEFAULT_MAX_MATCHES
            made.create_time.FromDatetime(datetime.now(UTC))
            payload = {
                "name": made.name,
                "policy": json_format.MessageToDict(made, preserving_proto_field_name=True),
            }
            batch = Batch([f"{made.name}@{made.version}"], np.ones((1, 1), np.float32), [payload])
            seq, _ = await self.store.upsert(COLLECTION, batch)
            return seq, made


class DecisionLog:
    """Every content decision, one JSON line each, in this instance's file.
    Past ``max_bytes`` the file is renamed to ``<name>.1`` (replacing the
    previous one) and a new one begun: at most about twice that on disk."""

    def __init__(self, path: Path, max_bytes: int = 64 * 1024 * 1024) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> str:
        decision_id = uuid.uuid4().hex
        line = json.dumps({"decision_id": decision_id, "time": time.time(), **entry})
        with self._lock:
            if self._file.tell() + len(line) >= self.max_bytes:
                self._file.close()
                self.path.replace(self.path.with_name(self.path.name + ".1"))
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(line + "\n")
            self._file.flush()
        return decision_id

    def close(self) -> None:
        with self._lock:
            self._file.close()

"""VectorService: the contract's calls over the store, the embedder and the
policies. Each method checks what protovalidate could not (convert.py),
then runs the engine on a worker thread (store.py).

Calls are admitted and metered like every chassis service's (per-key
request limits, one usage event per call, billed to the verified caller);
a call that writes or searches bills what it consumed instead of one
request: ``vectors`` written, or ``queries`` answered.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh.vectors.v1 import vectors_service_pb2 as rpc
from mlmesh.vectors.v1 import vectors_service_pb2_grpc
from mlmesh_chassis.auth import current_principal
from mlmesh_chassis.errors import FieldViolation, InvalidArgument
from mlmesh_chassis.pagination import offset_page
from mlmesh_metering.metering import consumed

from mlmesh_vectors import convert
from mlmesh_vectors.embedding import DIMENSION, Embedded, Embedder
from mlmesh_vectors.engine.base import Batch, CollectionSpec, Query, SearchOptions
from mlmesh_vectors.policies import DecisionLog, Policies, decide
from mlmesh_vectors.review_hook import ContentReviews
from mlmesh_vectors.store import VectorStore

DEFAULT_K = 10
DEFAULT_SCROLL = 100
MAX_SCROLL = 1000


class VectorServicer(vectors_service_pb2_grpc.VectorServiceServicer):
    def __init__(
        self,
        store: VectorStore,
        embedder: Embedder,
        policies: Policies,
        decisions: DecisionLog,
        default_ef: int = 64,
        reviews: ContentReviews | None = None,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.policies = policies
        self.decisions = decisions
        self.default_ef = default_ef
        # Near-threshold checks go to the human review queue (None: not).
        self.reviews = reviews or ContentReviews(None, 0.0)

    # ---- collections ---------------------------------------------------------

    async def CreateCollection(self, request, context):  # type: ignore[no-untyped-def]
        spec = convert.spec_of(request.collection)
        _, created = await self.store.create_collection(spec)
        state = await self.store.run(self.store.backend.get_collection, created.name)
        return rpc.CreateCollectionResponse(collection=convert.collection_message(state))

    async def GetCollection(self, request, context):  # type: ignore[no-untyped-def]
        state = await self.store.run(self.store.backend.get_collection, request.collection)
        return rpc.GetCollectionResponse(collection=convert.collection_message(state))

    async def ListCollections(self, request, context):  # type: ignore[no-untyped-def]
        specs = await self.store.run(self.store.backend.list_collections)
        visible = [s for s in specs if not s.name.startswith("_")]
        page, token = offset_page(visible, request.page_size, request.page_token)
        return rpc.ListCollectionsResponse(
            collections=[convert.collection_message(s) for s in page], next_page_token=token
        )

    async def DeleteCollection(self, request, context):  # type: ignore[no-untyped-def]
        _, deleted = await self.store.delete_collection(request.collection)
        return rpc.DeleteCollectionResponse(deleted=deleted)

    # ---- points ------------------------------------------------------------------

    async def UpsertPoints(self, request, context):  # type: ignore[no-untyped-def]
        spec = await self.store.spec(request.collection)
        batch = convert.batch_of(request.points, spec)
        seq, count = await self.store.upsert(spec.name, batch)
        consumed("vectors", count)
        return rpc.UpsertPointsResponse(upserted_count=count, write_sequence=seq)

    async def GetPoints(self, request, context):  # type: ignore[no-untyped-def]
        await self.store.caught_up(request.min_write_sequence)
        records = await self.store.run(
            self.store.backend.retrieve,
            request.collection,
            list(request.ids),
            request.with_payload,
            request.with_vector,
        )
        return rpc.GetPointsResponse(points=[convert.point_message(r) for r in records])

    async def DeletePoints(self, request, context):  # type: ignore[no-untyped-def]
        if request.WhichOneof("selector") == "ids":
            await self.store.spec(request.collection)  # NOT_FOUND for an unknown collection
            seq, deleted = await self.store.delete_ids(request.collection, list(request.ids.ids))
        else:
            spec = await self.store.spec(request.collection)
            filter = convert.filter_of(request.filter, spec)
            if filter is None:
                raise InvalidArgument.field(
                    "filter", "has no condition (delete the collection to delete every point)"
                )
            seq, deleted = await self.store.delete_by_filter(spec.name, filter)
        return rpc.DeletePointsResponse(deleted_count=deleted, write_sequence=seq)

    async def CountPoints(self, request, context):  # type: ignore[no-untyped-def]
        await self.store.caught_up(request.min_write_sequence)
        spec = await self.store.spec(request.collection)
        filter = convert.filter_of(request.filter, spec) if request.HasField("filter") else None
        count = await self.store.run(self.store.backend.count, spec.name, filter)
        return rpc.CountPointsResponse(count=count)

    async def ScrollPoints(self, request, context):  # type: ignore[no-untyped-def]
        spec = await self.store.spec(request.collection)
        filter = convert.filter_of(request.filter, spec) if request.HasField("filter") else None
        size = min(request.page_size or DEFAULT_SCROLL, MAX_SCROLL)
        records, offset = await self.store.run(
            self.store.backend.scroll,
            spec.name,
            _scroll_offset(request.page_token),
            size,
            filter,
            request.with_payload,
            request.with_vector,
        )
        return rpc.ScrollPointsResponse(
            points=[convert.point_message(r) for r in records], next_page_token=offset or ""
        )

    # ---- search ----------------------------------------------------------------

    def _options(self, request: Any) -> SearchOptions:
        return SearchOptions(
            with_payload=request.with_payload,
            with_vector=request.with_vector,
            hnsw_ef=request.params.hnsw_ef or self.default_ef,
            exact=request.params.exact,
        )

    def _query(self, request: Any, spec: CollectionSpec, vector: Any) -> Query:
        return Query(
            vector=vector,
            k=request.top_k or DEFAULT_K,
            filter=convert.filter_of(request.filter, spec) if request.HasField("filter") else None,
            score_threshold=(
                request.score_threshold if request.HasField("score_threshold") else None
            ),
        )

    async def _search_one(
        self, request: Any, spec: CollectionSpec, vector: Any, points: Any
    ) -> None:
        """Searches for ``vector`` with the request's settings; the hits are
        added to ``points`` (the response's)."""
        query = self._query(request, spec, vector)
        results = await self.store.run(
            self.store.backend.search,
            spec.name,
            [query],
            self._options(request),
        )
        consumed("queries", 1)
        convert.add_hits(points, results[0])

    async def Search(self, request, context):  # type: ignore[no-untyped-def]
        await self.store.caught_up(request.min_write_sequence)
        spec = await self.store.spec(request.collection)
        vector = convert.vector_of(request, spec, "vector")
        response = rpc.SearchResponse()
        await self._search_one(request, spec, vector, response.points)
        return response

    async def SearchBatch(self, request, context):  # type: ignore[no-untyped-def]
        """Every query checked and converted at once (one vector matrix, a
        repeated filter converted once), one engine call on one worker
        thread for the batch, one usage event."""
        await self.store.caught_up(request.min_write_sequence)
        spec = await self.store.spec(request.collection)
        items = request.queries
        vectors, filters = convert.batch_queries_of(items, spec)
        queries = [
            Query(
                vector=vectors[i],
                k=item.top_k or DEFAULT_K,
                filter=filters[i],
                score_threshold=(
                    item.score_threshold if item.HasField("score_threshold") else None
                ),
            )
            for i, item in enumerate(items)
        ]
        results = await self.store.run(
            self.store.backend.search,
            spec.name,
            queries,
            self._options(request),
        )
        consumed("queries", len(queries))
        response = rpc.SearchBatchResponse()
        add_result = response.results.add
        for hits in results:
            convert.add_hits(add_result().points, hits)
        return response

    async def Recommend(self, request, context):  # type: ignore[no-untyped-def]
        await self.store.caught_up(request.min_write_sequence)
        spec = await self.store.spec(request.collection)
        convert.check_unique([*request.positive_ids, *request.negative_ids], "examples")
        query = self._query(request, spec, None)
        hits = await self.store.run(
            self.store.backend.recommend,
            spec.name,
            list(request.positive_ids),
            list(request.negative_ids),
            query,
            self._options(request),
        )
        consumed("queries", 1)
        response = rpc.RecommendResponse()
        convert.add_hits(response.points, hits)
        return response

    # ---- snapshots -----------------------------------------------------------

    async def CreateSnapshot(self, request, context):  # type: ignore[no-untyped-def]
        info = await self.store.create_snapshot(request.collection)
        return rpc.CreateSnapshotResponse(snapshot=convert.snapshot_message(info))

    async def ListSnapshots(self, request, context):  # type: ignore[no-untyped-def]
        infos = await self.store.run(self.store.backend.list_snapshots, request.collection)
        return rpc.ListSnapshotsResponse(snapshots=[convert.snapshot_message(i) for i in infos])

    async def RestoreSnapshot(self, request, context):  # type: ignore[no-untyped-def]
        seq, state = await self.store.restore_snapshot(request.collection, request.snapshot)
        return rpc.RestoreSnapshotResponse(
            collection=convert.collection_message(state), write_sequence=seq
        )

    async def DeleteSnapshot(self, request, context):  # type: ignore[no-untyped-def]
        self.store.check_writable()
        await self.store.run(
            self.store.backend.delete_snapshot, request.collection, request.snapshot
        )
        return rpc.DeleteSnapshotResponse()

    # ---- texts and images ---------------------------------------------------

    async def _embedding_collection(self, name: str) -> CollectionSpec:
        spec = await self.store.spec(name)
        if spec.dimension != DIMENSION:
            raise InvalidArgument.field(
                "collection",
                f"collection {spec.name} has dimension {spec.dimension}; the text and image "
                f"models make {DIMENSION}",
            )
        return spec

    def _items_payloads(self, items: Sequence[Any], extra: list[dict]) -> list[dict]:
        """Each item's payload (with ``extra``), every item checked before
        anything is embedded: ids unique, payloads not reserved or oversized."""
        convert.check_unique([item.id for item in items], "items.id")
        violations: list[FieldViolation] = []
        payloads = []
        for i, item in enumerate(items):
            payload, bad = convert.payload_of(item.payload, f"items[{i}].payload")
            violations.extend(bad)
            payloads.append({**payload, **extra[i]})
        convert.fail(violations)
        return payloads

    async def _upsert_embedded(
        self, spec: CollectionSpec, items: Sequence[Any], embedded: Embedded, payloads: list[dict]
    ) -> tuple[int, int]:
        batch = Batch([item.id for item in items], embedded.vectors, payloads)
        seq, count = await self.store.upsert(spec.name, batch)
        consumed("vectors", count)
        return seq, count

    async def UpsertTexts(self, request, context):  # type: ignore[no-untyped-def]
        spec = await self._embedding_collection(request.collection)
        payloads = self._items_payloads(request.items, [{"text": i.text} for i in request.items])
        embedded = await self.embedder.texts([item.text for item in request.items])
        seq, count = await self._upsert_embedded(spec, request.items, embedded, payloads)
        return rpc.UpsertTextsResponse(
            upserted_count=count, write_sequence=seq, model=embedded.model
        )

    async def SearchText(self, request, context):  # type: ignore[no-untyped-def]
        await self.store.caught_up(request.min_write_sequence)
        spec = await self._embedding_collection(request.collection)
        embedded = await self.embedder.texts([request.text])
        response = rpc.SearchTextResponse()
        await self._search_one(request, spec, embedded.vectors[0], response.points)
        return response

    async def UpsertImages(self, request, context):  # type: ignore[no-untyped-def]
        spec = await self._embedding_collection(request.collection)
        payloads = self._items_payloads(request.items, [{} for _ in request.items])
        embedded = await self.embedder.images([item.image for item in request.items])
        seq, count = await self._upsert_embedded(spec, request.items, embedded, payloads)
        return rpc.UpsertImagesResponse(
            upserted_count=count, write_sequence=seq, model=embedded.model
        )

    async def SearchImage(self, request, context):  # type: ignore[no-untyped-def]
        await self.store.caught_up(request.min_write_sequence)
        spec = await self._embedding_collection(request.collection)
        embedded = await self.embedder.images([request.image], "image")
        response = rpc.SearchImageResponse()
        await self._search_one(request, spec, embedded.vectors[0], response.points)
        return response

    # ---- content policies -----------------------------------------------------

    async def CreatePolicy(self, request, context):  # type: ignore[no-untyped-def]
        _, policy = await self.policies.put(request.policy, create=True)
        return rpc.CreatePolicyResponse(policy=policy)

    async def UpdatePolicy(self, request, context):  # type: ignore[no-untyped-def]
        _, policy = await self.policies.put(request.policy, create=False)
        return rpc.UpdatePolicyResponse(policy=policy)

    async def GetPolicy(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.GetPolicyResponse(policy=await self.policies.get(request.name, request.version))

    async def ListPolicies(self, request, context):  # type: ignore[no-untyped-def]
        page, token = offset_page(await self.policies.list(), request.page_size, request.page_token)
        return rpc.ListPoliciesResponse(policies=page, next_page_token=token)

    async def CheckContent(self, request, context):  # type: ignore[no-untyped-def]
        policy = await self.policies.get(request.policy, request.policy_version)
        spec = await self._embedding_collection(policy.collection)
        if request.WhichOneof("content") == "text":
            embedded = await self.embedder.texts([request.text])
        else:
            embedded = await self.embedder.images([request.image], "image")
        query = Query(
            vector=embedded.vectors[0],
            k=policy.max_matches,
            score_threshold=policy.threshold - self.reviews.search_margin(policy),
        )
        results = await self.store.run(
            self.store.backend.search,
            spec.name,
            [query],
            SearchOptions(with_payload=True, hnsw_ef=self.default_ef),
        )
        # The decision sees the policy's own margin only (the search may reach
        # further for the review queue's near-threshold checks).
        floor = policy.threshold - policy.review_margin
        verdict = decide(policy, [h for h in results[0] if h.score >= floor])
        decision_id = self.decisions.record(
            {
                "key_id": current_principal().key_id,
                "policy": policy.name,
                "policy_version": policy.version,
                "decision": pb.Decision.Name(verdict.decision),
                "evidence": [(e.id, e.label, round(e.score, 6)) for e in verdict.evidence],
                "model": embedded.model,
            }
        )
        self.reviews.offer(
            policy,
            results[0],
            verdict.decision,
            decision_id,
            embedded.model,
            request.text if request.WhichOneof("content") == "text" else None,
            len(request.image),
        )
        consumed("queries", 1)
        return rpc.CheckContentResponse(
            decision=verdict.decision,
            evidence=verdict.evidence,
            policy=policy.name,
            policy_version=policy.version,
            decision_id=decision_id,
            model=embedded.model,
        )


def _scroll_offset(token: str) -> str | None:
    """A scroll page token is the engine id of the next point (a UUID)."""
    if not token:
        return None
    try:
        return str(uuid.UUID(token))
    except ValueError as error:
        raise InvalidArgument.field("page_token", "is not a token this scroll returned") from error

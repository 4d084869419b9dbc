"""build_server(settings): the vector service over this instance's store."""

from __future__ import annotations

import asyncio

from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_VECTORS
from mlmesh.vectors.v1 import vectors_service_pb2_grpc
from mlmesh_chassis.server import ServiceHost, start_service
from mlmesh_inference.triton import TritonClient
from mlmesh_metering.metering import metered_calls
from mlmesh_sdk.review import ReviewSubmitter

from mlmesh_vectors.config import VectorsSettings
from mlmesh_vectors.embedding import Embedder
from mlmesh_vectors.policies import DecisionLog, Policies
from mlmesh_vectors.registration import REGISTRATION
from mlmesh_vectors.review_hook import ContentReviews
from mlmesh_vectors.servicer import VectorServicer
from mlmesh_vectors.store import VectorStore


async def build_server(settings: VectorsSettings) -> ServiceHost:
    # Opening the engine (and, on the primary, taking the replicas' bases)
    # is disk work: off the event loop.
    store = await asyncio.to_thread(VectorStore.open, settings)
    store.start(settings.follow_interval_seconds)
    triton = TritonClient(settings.triton_target) if settings.triton_target else None
    decisions = DecisionLog(settings.root / "decisions" / f"{settings.instance}.jsonl")
    admission, meter = metered_calls(settings, PLATFORM_SERVICE_VECTORS)
    embedder = Embedder(triton, settings.text_model, settings.image_model)
    policies = Policies(store)
    submitter = ReviewSubmitter(settings.review_target) if settings.review_target else None
    servicer = VectorServicer(
        store,
        embedder,
        policies,
        decisions,
        settings.default_hnsw_ef,
        ContentReviews(submitter, settings.review_near_margin),
    )

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        vectors_service_pb2_grpc.add_VectorServiceServicer_to_server(servicer, server)
        return REGISTRATION.service_names()

    host = await start_service(
        settings, register, error_domain="mlmesh.vectors", admission=admission
    )
    if settings.demo and settings.is_primary and triton is not None:
        from mlmesh_vectors.demo import seed

        host.background.append(asyncio.create_task(seed(store, embedder, policies)))
    # on_close runs last first: the engine closes after the server stopped.
    host.on_close.append(lambda: asyncio.to_thread(store.close))
    host.on_close.append(lambda: asyncio.to_thread(decisions.close))
    if triton is not None:
        host.on_close.append(triton.close)
    if meter is not None:
        host.on_close.append(meter.close)
    if submitter is not None:
        host.on_close.append(submitter.close)
    return host

"""What a key may call, and where each model is served (ListModels and
``GET /v1/models``).

A model is listed to a key only when the key may use it (its scopes and
model patterns, ``authorize``): a caller never learns the names of models it
cannot call. Each entry says what serves it (the llm service, an
OpenAI-compatible upstream, Triton), the regions its endpoints are in (never
their addresses), and what it can do, which decides the calls and OpenAI
paths that take it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.auth import authorize
from mlmesh_chassis.errors import MlmeshError

from mlmesh_gateway.balancer import LatencyAwareBalancer
from mlmesh_gateway.llm_router import LlmRouter
from mlmesh_gateway.upstreams import Upstream

GENERATIVE = (
    pb.MODEL_CAPABILITY_CHAT,
    pb.MODEL_CAPABILITY_COMPLETION,
    pb.MODEL_CAPABILITY_STREAMING,
)
SERVICE_OF_KIND = {
    pb.MODEL_KIND_LLM: pb.PLATFORM_SERVICE_GENERATE,
    pb.MODEL_KIND_CLASSIC: pb.PLATFORM_SERVICE_INFER,
    pb.MODEL_KIND_EMBEDDING: pb.PLATFORM_SERVICE_EMBED,
}


def _regions(balancer: LatencyAwareBalancer) -> list[str]:
    return sorted({endpoint.region for endpoint in balancer.endpoints})


class Catalog:
    def __init__(
        self,
        llm: LatencyAwareBalancer,
        upstreams: Mapping[str, tuple[Upstream, LlmRouter]],
        llm_models: Sequence[str],
        classic_models: Sequence[str],
        embedding_models: Sequence[str],
        home_region: str = "",
    ) -> None:
        here = [home_region or "default"]
        models: dict[str, pb.ServedModel] = {}
        for name in llm_models:
            models[name] = pb.ServedModel(
                model=name,
                kind=pb.MODEL_KIND_LLM,
                backend=pb.MODEL_BACKEND_LLM_SERVICE,
                regions=_regions(llm),
                capabilities=GENERATIVE,
            )
        for name, (_, router) in upstreams.items():
            models[name] = pb.ServedModel(
                model=name,
                kind=pb.MODEL_KIND_LLM,
                backend=pb.MODEL_BACKEND_OPENAI_COMPATIBLE,
                regions=_regions(router.balancer),
                capabilities=GENERATIVE,
            )
        for name in classic_models:
            models[name] = pb.ServedModel(
                model=name,
                kind=pb.MODEL_KIND_CLASSIC,
                backend=pb.MODEL_BACKEND_TRITON,
                regions=here,
                capabilities=[pb.MODEL_CAPABILITY_INFER],
            )
        for name in embedding_models:
            models[name] = pb.ServedModel(
                model=name,
                kind=pb.MODEL_KIND_EMBEDDING,
                backend=pb.MODEL_BACKEND_TRITON,
                regions=here,
                capabilities=[pb.MODEL_CAPABILITY_EMBEDDING, pb.MODEL_CAPABILITY_INFER],
            )
        self.models = models

    def get(self, name: str) -> pb.ServedModel | None:
        return self.models.get(name)

    def visible(self, key: pb.Key, kind: int = 0) -> list[pb.ServedModel]:
        """The models ``key`` may call (of ``kind``; 0: all), by name."""
        listed = []
        for name in sorted(self.models):
            model = self.models[name]
            if kind and model.kind != kind:
                continue
            try:
                authorize(key, SERVICE_OF_KIND[model.kind], name)
            except MlmeshError:
                continue
            listed.append(model)
        return listed

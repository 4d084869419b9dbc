"""What the registry says about a model, cached for a moment: the version an
alias points at, and the model's running A/B experiment.

Reads go to the registry at most once per ``ttl_s`` per model (2 s by
default), so an alias move or a new experiment reaches the gateway within
that time, whichever replica serves the request.
"""

from __future__ import annotations

import time

from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.registry.v1 import model_pb2
from mlmesh.registry.v1 import registry_service_pb2 as registry_rpc
from mlmesh_sdk.registry import RegistryClient


class ModelDirectory:
    def __init__(self, registry_target: str, ttl_s: float = 2.0) -> None:
        self.registry_target = registry_target
        self.ttl_s = ttl_s
        self._client: RegistryClient | None = None
        self._versions: dict[tuple[str, str], tuple[float, int]] = {}
        self._experiments: dict[str, tuple[float, model_pb2.Experiment | None]] = {}

    async def _registry(self) -> RegistryClient:
        if self._client is None:
            self._client = await RegistryClient(self.registry_target).__aenter__()
        return self._client

    async def version(self, model: str, alias: str) -> int:
        """The version ``model@alias`` (or the newest, alias "") points at."""
        cached = self._versions.get((model, alias))
        if cached and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        reference = (
            ModelReference(model=model, alias=alias) if alias else ModelReference(model=model)
        )
        resolved = await (await self._registry()).resolve(reference)
        self._versions[(model, alias)] = (time.monotonic(), int(resolved.version))
        return int(resolved.version)

    async def experiment(self, model: str) -> model_pb2.Experiment | None:
        """The model's running experiment, if any (the first by name)."""
        cached = self._experiments.get(model)
        if cached and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        registry = await self._registry()
        reply = await registry.stub.ListExperiments(
            registry_rpc.ListExperimentsRequest(
                model=model, state=model_pb2.EXPERIMENT_STATE_RUNNING, page_size=1
            )
        )
        experiment = reply.experiments[0] if reply.experiments else None
        self._experiments[model] = (time.monotonic(), experiment)
        return experiment

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

"""TritonRouter: Infer and Embed calls to Triton, at the version the
traffic split picks, with the experiment's shadow mirrored.

When Triton no longer has an alias's version (the deployer moved on before
this replica heard of the move), the alias is re-resolved from the registry
once and the call retried at the version it points at now.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh_chassis.errors import NotFound, Unavailable
from mlmesh_inference.triton import InferResult, TritonClient
from mlmesh_metering import MeteredCall

from mlmesh_gateway.directory import ModelDirectory
from mlmesh_gateway.shadows import (
    SHADOW_TOLERANCE,
    ShadowComparison,
    ShadowRunner,
    max_abs_difference,
    render_tensors,
)
from mlmesh_gateway.traffic_split import TrafficSplit

Parameters = Mapping[str, str | bool | int | float]


class TritonRouter:
    def __init__(
        self, triton: TritonClient | None, directory: ModelDirectory | None, shadows: ShadowRunner
    ) -> None:
        self.triton = triton
        self.split = TrafficSplit(directory, self._ready, pin_served=True)
        self.shadows = shadows

    def client(self) -> TritonClient:
        if self.triton is None:
            raise Unavailable("no Triton server is configured", retry_after_s=5.0)
        return self.triton

    async def _ready(self, model: str, version: int) -> bool:
        return self.triton is not None and await self.triton.model_ready(model, str(version))

    async def infer(
        self,
        reference: ModelReference,
        key_id: str,
        headers: Mapping[str, str],
        call: MeteredCall,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        parameters: Parameters | None = None,
    ) -> InferResult:
        """Runs the model for ``call`` (its version set to the one that answered)."""
        triton = self.client()
        split = await self.split.route(reference, key_id, headers)
        model, version = reference.model, split.version

        async def run(version: int, request_id: str) -> InferResult:
            return await triton.infer(
                model,
                inputs,
                version=str(version or ""),
                outputs=outputs,
                request_id=request_id,
                parameters=parameters,
            )

        try:
            result = await run(version, call.call_id)
        except NotFound:
            if not split.resolved or (version := await self.split.reresolve(reference)) in (
                0,
                split.version,
            ):
                raise
            result = await run(version, call.call_id)
        call.version = int(result.model_version or version or 0)
        if split.shadow and split.shadow != call.version and split.experiment is not None:

            async def difference() -> ShadowComparison:
                shadow = await run(split.shadow, f"{call.call_id}-shadow")
                diff = max_abs_difference(result.outputs, shadow.outputs)
                if diff <= SHADOW_TOLERANCE:
                    return ShadowComparison(diff)
                # Rendered for the review queue only when they disagree.
                return ShadowComparison(
                    diff,
                    "infer",
                    render_tensors(inputs),
                    render_tensors(result.outputs),
                    render_tensors(shadow.outputs),
                )

            versions = (call.version, split.shadow)
            self.shadows.mirror(call.call_id, split.experiment, model, versions, difference)
        return result

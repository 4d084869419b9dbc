"""TrafficSplit: which version of a model one request goes to.

- A reference by version goes to that version, as asked.
- Otherwise the model's running experiments (from the followed registry,
  ``directory.py``) split the traffic: callers are spread over the running
  experiments by their key (sticky while the set of experiments stays), then
  over the experiment's arms by its stickiness key and the arms' weights
  (``experiments.choose_arm``: the same on every replica).
- Only to an arm whose version is loaded (``loaded``: the llm's served
  models, or Triton's model readiness; asked at most once per
  ``ready_ttl_s`` per version). An arm not loaded yet (the backends load it
  after the experiment starts) is skipped: the request is served as without
  the experiment, so a new experiment never turns requests into NOT_FOUND.
- Without an experiment the alias's version is pinned (``pin_served``, for
  Triton, which may hold several versions) or the reference goes as asked
  (the llm follows aliases itself).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.registry.v1 import model_pb2

from mlmesh_gateway.directory import ModelDirectory
from mlmesh_gateway.experiments import choose_arm, mirror, spread
from mlmesh_gateway.telemetry import annotate

Loaded = Callable[[str, int], Awaitable[bool]]
# Versions whose readiness is remembered (experiments' versions: few).
MAX_READY_ENTRIES = 1024


@dataclass(frozen=True)
class Split:
    """Where one request goes."""

    # The version to pin (0: the reference as asked).
    version: int = 0
    # The experiment whose arm it is, if any.
    experiment: model_pb2.Experiment | None = None
    arm: str = ""
    # The version to mirror the request to (0: none).
    shadow: int = 0
    # ``version`` is the alias's (worth re-resolving when a backend lacks it).
    resolved: bool = False


class ReadyCache:
    """Whether a version is loaded, asked at most once per ``ttl_s`` each."""

    def __init__(self, loaded: Loaded, ttl_s: float = 1.0) -> None:
        self._loaded = loaded
        self.ttl_s = ttl_s
        self._seen: dict[tuple[str, int], tuple[float, bool]] = {}

    async def __call__(self, model: str, version: int) -> bool:
        now = time.monotonic()
        cached = self._seen.get((model, version))
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        ready = await self._loaded(model, version)
        if len(self._seen) >= MAX_READY_ENTRIES:
            self._seen.clear()
        self._seen[(model, version)] = (now, ready)
        return ready


class TrafficSplit:
    def __init__(
        self, directory: ModelDirectory | None, loaded: Loaded, *, pin_served: bool
    ) -> None:
        self.directory = directory
        self.loaded = ReadyCache(loaded)
        self.pin_served = pin_served

    async def route(
        self, reference: ModelReference, key_id: str, headers: Mapping[str, str]
    ) -> Split:
        selector = reference.WhichOneof("selector")
        if selector == "version":
            return Split(version=reference.version)
        if self.directory is None:
            return Split()
        alias = reference.alias if selector == "alias" else ""
        served = await self.directory.served(reference.model, alias)
        without = (
            Split(version=served.served.version, resolved=True) if self.pin_served else Split()
        )
        running = [e for e in served.running if e.arms]
        if not running:
            return without
        names = "\0".join(e.name for e in running)
        experiment = running[spread(names, key_id, len(running))]
        arm = choose_arm(experiment, sticky_value(experiment, key_id, headers))
        if not await self.loaded(reference.model, arm.version):
            annotate(**{"mlmesh.experiment.arm_loaded": False})
            return without
        annotate(**{"mlmesh.experiment": experiment.name, "mlmesh.experiment.arm": arm.name})
        shadow = mirror(experiment)
        if shadow == arm.version or (shadow and not await self.loaded(reference.model, shadow)):
            shadow = 0
        return Split(arm.version, experiment, arm.name, shadow)

    async def reresolve(self, reference: ModelReference) -> int:
        """The alias's version as the registry says now (0 without one)."""
        if self.directory is None:
            return 0
        alias = reference.alias if reference.WhichOneof("selector") == "alias" else ""
        return int((await self.directory.reread(reference.model, alias)).served.version)


def sticky_value(experiment: model_pb2.Experiment, key_id: str, headers: Mapping[str, str]) -> str:
    """What keeps a caller on one arm: its key, or a header it sends
    (`user_id` is read from `x-mlmesh-user-id`: the front door rejects
    headers with underscores); the key when the header is missing."""
    if experiment.stickiness_key in ("", "api_key"):
        return key_id
    header = f"x-mlmesh-{experiment.stickiness_key.replace('_', '-')}"
    return str(headers.get(header, key_id))

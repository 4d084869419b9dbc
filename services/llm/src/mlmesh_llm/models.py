"""Which model versions this server serves, and hot swaps on alias moves.

For each configured reference (``tiny-llama@champion``) the manager follows
what to hold (``mlmesh_serving.follow_served``: the alias' version and the
versions of the model's running experiments), takes each version's folder
from the shared artifact cache, and starts an engine on it. When the alias
moves it loads the new version beside the old one, switches new requests to
it, and stops the old engine once its in-flight streams end; experiment
versions stay loaded beside it while their experiment runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from mlmesh.common.v1 import model_reference_pb2
from mlmesh_chassis.errors import FailedPrecondition, NotFound, Reason
from mlmesh_sdk.reference import format_reference, parse_reference
from mlmesh_sdk.snapshot import UnpackLimits, UnsafeArchiveError
from mlmesh_serving import (
    MAX_RETRY_SECONDS,
    ArtifactCache,
    ServedVersions,
    backoff_delays,
    follow_served,
)

from mlmesh_llm.engines.base import Engine

log = logging.getLogger("mlmesh.llm.models")
ModelReference = model_reference_pb2.ModelReference
EngineFactory = Callable[[Path], Engine]


@dataclass(eq=False)
class LoadedVersion:
    """One model version running on one engine."""

    model: str
    version: int
    engine: Engine
    load_time: dt.datetime
    in_flight: int = 0
    draining: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Served:
    """A configured reference and the version serving it now."""

    reference: ModelReference
    current: LoadedVersion | None = None


class ModelManager:
    def __init__(
        self,
        references: list[str],
        registry_target: str,
        cache_dir: Path,
        engine_factory: EngineFactory,
        retry_seconds: float = 2.0,
        *,
        max_retry_seconds: float = MAX_RETRY_SECONDS,
        unpack_limits: UnpackLimits | None = None,
    ) -> None:
        self.served = [Served(parse_reference(text)) for text in references]
        self.registry_target = registry_target
        self.cache = ArtifactCache(cache_dir, registry_target, unpack_limits)
        self.engine_factory = engine_factory
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self._sleep = asyncio.sleep  # tests replace it
        self.loaded: list[LoadedVersion] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Versions kept loaded for running experiments, per model.
        self.experiment_versions: dict[str, frozenset[int]] = {}
        self._swap_lock = asyncio.Lock()
        self.ready = asyncio.Event()

    # ---- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Follows every configured reference: loads what it holds (retrying
        while the registry cannot give it) and whatever it holds next. Sets
        ``ready`` once every reference has a version loaded."""
        for served in self.served:
            self._tasks.append(asyncio.create_task(self._follow(served)))

    async def _follow(self, served: Served) -> None:
        async for wanted in follow_served(
            self.registry_target, served.reference, self.retry_seconds, self.max_retry_seconds
        ):
            # A version that keeps failing (a broken artifact) is retried ever
            # more rarely, up to max_retry_seconds apart.
            delays = backoff_delays(self.retry_seconds, self.max_retry_seconds)
            while True:
                try:
                    await self._apply(served, wanted)
                    break
                except (grpc.RpcError, OSError, ValueError) as error:
                    delay = next(delays)
                    refused = isinstance(error, UnsafeArchiveError)
                    log.warning(
                        "cannot load %s/%s yet: %s%s; retrying in %.0f s",
                        wanted.model,
                        ",".join(map(str, sorted(wanted.versions))),
                        "its artifact is refused: " if refused else "",
                        _describe(error),
                        delay,
                    )
                    await self._sleep(delay)
            if all(s.current is not None for s in self.served):
                self.ready.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for loaded in list(self.loaded):
            await self._stop_engine(loaded)

    # ---- lookups ------------------------------------------------------------

    def lookup(self, reference: ModelReference) -> LoadedVersion:
        """The loaded version serving ``reference``; NOT_FOUND otherwise."""
        selector = reference.WhichOneof("selector")
        text = format_reference(reference)
        if selector == "version":
            for loaded in self.loaded:
                if loaded.model == reference.model and loaded.version == reference.version:
                    return loaded
            raise NotFound(
                "model",
                text,
                f"model version {text!r} is not loaded on this server",
                Reason.ERROR_REASON_MODEL_NOT_LOADED,
            )
        for served in self.served:
            if served.reference.model != reference.model:
                continue
            if selector == "alias" and served.reference.alias != reference.alias:
                continue
            if served.current is None:
                raise FailedPrecondition(f"model {text!r} is still loading", model=text)
            return served.current
        raise NotFound(
            "model",
            text,
            f"model {text!r} is not served by this server",
            Reason.ERROR_REASON_MODEL_NOT_LOADED,
        )

    @contextlib.contextmanager
    def lease(self, loaded: LoadedVersion) -> Iterator[Engine]:
        """Counts a request on a version, so a swap stops it only when idle."""
        loaded.in_flight += 1
        try:
            yield loaded.engine
        finally:
            loaded.in_flight -= 1
            if loaded.draining and loaded.in_flight == 0:
                self._tasks.append(asyncio.create_task(self._stop_engine(loaded)))

    def current_versions(self) -> list[tuple[Served, LoadedVersion]]:
        return [(s, s.current) for s in self.served if s.current is not None]

    # ---- loading and swapping ----------------------------------------------

    async def _apply(self, served: Served, wanted: ServedVersions) -> None:
        """Loads what ``wanted`` holds that is not loaded yet (experiment
        versions first, then the served one), switches new requests to the
        served version, then retires (once idle) and evicts from the cache
        what no reference and no running experiment holds any more."""
        model = wanted.model
        async with self._swap_lock:
            for version in sorted(wanted.experiments):
                await self._ensure_loaded(model, version)
            current = await self._ensure_loaded(model, wanted.served.version)
            previous, served.current = served.current, current
            self.experiment_versions[model] = wanted.experiments
            if previous is not current:
                log.info(
                    "serving %s with version %d",
                    format_reference(served.reference),
                    current.version,
                )
            if wanted.experiments:
                log.info("%s: experiment versions loaded: %s", model, sorted(wanted.experiments))
            for loaded in [v for v in self.loaded if v.model == model]:
                await self._retire_if_unused(loaded)
            held = {v.version for v in self.loaded if v.model == model}
            await self.cache.retain(model, held | wanted.versions)

    async def _ensure_loaded(self, model: str, version: int) -> LoadedVersion:
        """The running engine for ``model``/``version``, downloading and
        starting it if needed."""
        existing = next(
            (
                v
                for v in self.loaded
                if v.model == model and v.version == version and not v.draining
            ),
            None,
        )
        if existing is not None:
            return existing
        folder = await self.cache.folder(model, version)
        engine = self.engine_factory(folder)
        await engine.start()
        loaded = LoadedVersion(model, version, engine, dt.datetime.now(dt.UTC))
        self.loaded.append(loaded)
        return loaded

    async def _retire_if_unused(self, loaded: LoadedVersion) -> None:
        """Stops a version no reference and no experiment uses, once idle."""
        if loaded.draining or any(s.current is loaded for s in self.served):
            return
        if loaded.version in self.experiment_versions.get(loaded.model, frozenset()):
            return
        loaded.draining = True
        if loaded.in_flight == 0:
            await self._stop_engine(loaded)

    async def _stop_engine(self, loaded: LoadedVersion) -> None:
        if loaded.stopped.is_set():
            return
        loaded.stopped.set()
        if loaded in self.loaded:
            self.loaded.remove(loaded)
        await loaded.engine.stop()
        log.info("stopped %s/%d", loaded.model, loaded.version)


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
    return str(error)

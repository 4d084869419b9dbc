"""Keeps Triton's model repository in step with registry aliases.

For each followed reference (``digits@champion``) the Triton model is named
after the registry model and its versions are registry versions. What to hold
comes from ``mlmesh_serving.follow_served``: the alias' version and the
versions of the model's running experiments. On a change: take each wanted
version's folder from the artifact cache, write it into the repository, load
the model with the old live version and every wanted one, wait until the
wanted ones are ready (new requests without a version go to the highest
loaded one), then load with the wanted versions alone, which unloads the
others after their in-flight requests finish. Moving to a lower version works
the same way; the switch then happens at the second load. A reconcile loop
reloads live versions a restarted Triton lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh_inference.triton import TritonClient
from mlmesh_sdk.reference import format_reference, parse_reference
from mlmesh_sdk.snapshot import UnpackLimits, UnsafeArchiveError
from mlmesh_serving import (
    MAX_RETRY_SECONDS,
    ArtifactCache,
    ServedVersions,
    backoff_delays,
    follow_served,
)

log = logging.getLogger("mlmesh.deployer")


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class Deployment:
    reference: ModelReference
    live_version: int = 0
    target_version: int = 0
    state: State = State.LOADING
    message: str = ""
    update_time: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    # Versions kept live beside live_version for running experiments.
    experiment_versions: set[int] = field(default_factory=set)

    @property
    def model(self) -> str:
        return self.reference.model

    def set(self, state: State, message: str = "") -> None:
        self.state, self.message = state, message
        self.update_time = dt.datetime.now(dt.UTC)


class TritonDeployer:
    def __init__(
        self,
        references: list[str],
        registry_target: str,
        triton: TritonClient,
        repository: Path,
        cache_dir: Path,
        *,
        reconcile_seconds: float = 2.0,
        load_timeout_s: float = 300.0,
        retry_seconds: float = 2.0,
        max_retry_seconds: float = MAX_RETRY_SECONDS,
        unpack_limits: UnpackLimits | None = None,
    ) -> None:
        self.deployments = [Deployment(parse_reference(text)) for text in references]
        models = [d.model for d in self.deployments]
        if len(set(models)) != len(models):
            raise ValueError(f"one alias per model: {references}")
        self.registry_target = registry_target
        self.triton = triton
        self.repository = repository
        self.cache = ArtifactCache(cache_dir, registry_target, unpack_limits)
        self.reconcile_seconds = reconcile_seconds
        self.load_timeout_s = load_timeout_s
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self._sleep = asyncio.sleep  # tests replace it
        self._tasks: list[asyncio.Task[None]] = []
        self._locks = {d.model: asyncio.Lock() for d in self.deployments}
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self.repository.mkdir(parents=True, exist_ok=True)
        for deployment in self.deployments:
            self._tasks.append(asyncio.create_task(self._follow(deployment)))
        self._tasks.append(asyncio.create_task(self._reconcile()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _follow(self, deployment: Deployment) -> None:
        async for wanted in follow_served(
            self.registry_target, deployment.reference, self.retry_seconds, self.max_retry_seconds
        ):
            deployment.target_version = wanted.served.version
            delays = backoff_delays(self.retry_seconds, self.max_retry_seconds)
            while True:
                try:
                    await self._roll(deployment, wanted)
                    break
                except Exception as error:  # registry, Triton or disk: retry, ever more rarely
                    delay = next(delays)
                    what = (
                        "its artifact is refused"
                        if isinstance(error, UnsafeArchiveError)
                        else "deploying it failed"
                    )
                    log.warning(
                        "%s/%s: %s: %s; retrying in %.0f s",
                        wanted.model,
                        ",".join(map(str, sorted(wanted.versions))),
                        what,
                        error,
                        delay,
                    )
                    deployment.set(State.FAILED, str(error))
                    await self._sleep(delay)
            if all(d.state is State.READY for d in self.deployments):
                self.ready.set()

    async def _roll(self, deployment: Deployment, wanted: ServedVersions) -> None:
        async with self._locks[deployment.model]:
            old, new = deployment.live_version, wanted.served.version
            before = {old, *deployment.experiment_versions} - {0}
            keep = set(wanted.versions)
            if before == keep and old == new:
                deployment.set(State.READY)
                return
            deployment.set(State.LOADING)
            model_dir = self.repository / deployment.model
            folders = {}
            for version in sorted(keep):
                folders[version] = await self.cache.folder(deployment.model, version)
                await asyncio.to_thread(_install, folders[version], model_dir, version)
            config_from = folders[new]  # the served version's config.pbtxt
            # 1: the old live version beside every wanted one; wait for those.
            _write_config(config_from, model_dir, deployment.model, sorted(before | keep))
            await self._load(deployment.model)
            for version in sorted(keep):
                await self._wait_ready(deployment.model, version)
            deployment.live_version = new
            deployment.experiment_versions = set(wanted.experiments)
            deployment.set(State.READY)
            if old != new:
                log.info(
                    "%s: version %d is live on Triton", format_reference(deployment.reference), new
                )
            if wanted.experiments:
                log.info(
                    "%s: experiment versions live: %s",
                    deployment.model,
                    sorted(wanted.experiments),
                )
            # 2: the wanted ones alone; Triton unloads the rest after their
            # in-flight requests.
            dropped = before - keep
            if dropped:
                _write_config(config_from, model_dir, deployment.model, sorted(keep))
                await self._load(deployment.model)
                for version in sorted(dropped):
                    await asyncio.to_thread(shutil.rmtree, model_dir / str(version), True)
                    log.info("%s: version %d unloaded", deployment.model, version)
            await self.cache.retain(deployment.model, keep)

    async def _load(self, model: str) -> None:
        # Triton re-reads config.pbtxt from the repository on every load.
        await self.triton.load_model(model)

    async def _wait_ready(self, model: str, version: int) -> None:
        deadline = asyncio.get_running_loop().time() + self.load_timeout_s
        while not await self._is_ready(model, version):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(
                    f"{model}/{version} not ready on Triton after {self.load_timeout_s}s"
                )
            await asyncio.sleep(0.1)

    async def _is_ready(self, model: str, version: int) -> bool:
        return await self.triton.model_ready(model, str(version))

    async def _reconcile(self) -> None:
        """Reloads live versions Triton does not have (e.g. after a restart)."""
        while True:
            await asyncio.sleep(self.reconcile_seconds)
            for deployment in self.deployments:
                live = deployment.live_version
                if not live or self._locks[deployment.model].locked():
                    continue
                if await self._is_ready(deployment.model, live):
                    if deployment.state is not State.READY:  # Triton reloaded it itself
                        deployment.set(State.READY)
                    continue
                async with self._locks[deployment.model]:
                    if deployment.live_version != live:
                        continue  # a roll moved it meanwhile (and waited for the new one)
                    try:
                        log.warning(
                            "%s/%d is not ready on Triton; reloading", deployment.model, live
                        )
                        await self._load(deployment.model)
                        await self._wait_ready(deployment.model, live)
                        deployment.set(State.READY)
                    except Exception as error:  # Triton still down: next round
                        deployment.set(State.FAILED, str(error))


def _install(folder: Path, model_dir: Path, version: int) -> None:
    target = model_dir / str(version)
    if target.exists():
        return
    staging = model_dir / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(folder / "payload", staging)
    staging.rename(target)


_NAME = re.compile(r"^\s*name\s*:.*$", re.MULTILINE)
_POLICY = re.compile(r"^\s*version_policy\s*:.*$", re.MULTILINE)


def _write_config(folder: Path, model_dir: Path, model: str, versions: list[int]) -> None:
    """config.pbtxt: the artifact's, with our name and version policy."""
    body = _POLICY.sub("", _NAME.sub("", (folder / "config.pbtxt").read_text()))
    text = (
        f'name: "{model}"\n{body.strip()}\n'
        f"version_policy: {{ specific: {{ versions: [ {', '.join(map(str, versions))} ] }} }}\n"
    )
    path = model_dir / "config.pbtxt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)

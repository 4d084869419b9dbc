"""What the registry says a model reference serves, followed live: the
version an alias points at and the model's running experiments
(``mlmesh_serving.follow_served``, the follower the llm and the deployer use).

One follower per reference actually asked for (``model@alias``, or the bare
name), started on first use, after a first read has proved the reference
exists: a name the registry does not know costs one read and starts nothing.
At most ``max_followed`` followers run; the least recently asked-for one is
stopped to make room. ``close`` stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh_sdk.registry import RegistryClient
from mlmesh_serving import ServedVersions, follow_served, read_served_versions

log = logging.getLogger("mlmesh.gateway")
MAX_FOLLOWED = 128
Follow = Callable[..., AsyncIterator[ServedVersions]]


class _Followed:
    """One followed reference: its latest read and the task keeping it fresh."""

    def __init__(self) -> None:
        self.first: asyncio.Future[ServedVersions] = asyncio.get_running_loop().create_future()
        self.current: ServedVersions | None = None
        self.task: asyncio.Task[None] | None = None


class ModelDirectory:
    def __init__(
        self,
        registry_target: str,
        max_followed: int = MAX_FOLLOWED,
        follow: Follow = follow_served,
    ) -> None:
        self.registry_target = registry_target
        self.max_followed = max_followed
        self._follow = follow
        self._client: RegistryClient | None = None
        self._followed: OrderedDict[tuple[str, str], _Followed] = OrderedDict()

    async def _registry(self) -> RegistryClient:
        if self._client is None:
            self._client = await RegistryClient(self.registry_target).__aenter__()
        return self._client

    async def served(self, model: str, alias: str = "") -> ServedVersions:
        """What ``model@alias`` (``model``: its newest version) serves now."""
        key = (model, alias)
        entry = self._followed.get(key)
        if entry is not None:
            self._followed.move_to_end(key)
            if entry.current is not None:
                return entry.current
            try:
                return await asyncio.shield(entry.first)
            except asyncio.CancelledError:
                if not entry.first.cancelled():
                    raise  # this request was cancelled
                return await self.served(model, alias)  # the first reader's was: read again
        entry = self._followed[key] = _Followed()
        try:
            current = await self._read(key)
        except BaseException as error:
            del self._followed[key]  # nothing is followed for a reference that failed
            if isinstance(error, asyncio.CancelledError):
                entry.first.cancel()
            else:
                entry.first.set_exception(error)
                entry.first.exception()  # retrieved: waiters see it, the loop logs nothing
            raise
        entry.current = current
        entry.first.set_result(current)
        if self._followed.get(key) is not entry:
            return current  # made room for others while it was read: not followed
        entry.task = asyncio.create_task(self._keep_fresh(key, entry))
        while len(self._followed) > self.max_followed:
            _, evicted = self._followed.popitem(last=False)
            if evicted.task is not None:
                evicted.task.cancel()
        return current

    async def reread(self, model: str, alias: str = "") -> ServedVersions:
        """Asks the registry now (a backend said the followed version is
        gone: the follower may not have seen the move yet)."""
        now = await self._read((model, alias))
        entry = self._followed.get((model, alias))
        if entry is not None:
            entry.current = now
        return now

    async def _read(self, key: tuple[str, str]) -> ServedVersions:
        return await read_served_versions(await self._registry(), _reference(*key))

    async def _keep_fresh(self, key: tuple[str, str], entry: _Followed) -> None:
        try:
            async for now in self._follow(
                self.registry_target, _reference(*key), same=ServedVersions.same_routing_as
            ):
                entry.current = now
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the next request starts a new follower
            log.warning("following %s@%s stopped: %s", *key, error)
            if self._followed.get(key) is entry:
                del self._followed[key]

    async def close(self) -> None:
        tasks = [e.task for e in self._followed.values() if e.task is not None]
        self._followed.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.close()


def _reference(model: str, alias: str) -> ModelReference:
    return ModelReference(model=model, alias=alias) if alias else ModelReference(model=model)

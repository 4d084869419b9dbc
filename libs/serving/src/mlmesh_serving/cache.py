"""Model versions downloaded from the registry, one folder each.

``ArtifactCache.folder(model, version)`` gives a version's unpacked folder,
downloading it first if the cache does not hold it:

- **atomic**: the download unpacks into a folder of this process's own,
  which is renamed into place only when complete. Replicas sharing one cache
  never see, use or delete a half download, and a crash leaves no folder
  that looks complete;
- **bounded**: unpacking obeys ``UnpackLimits`` (members, expanded size;
  sparse files, links out of the folder and the like are refused);
- **evicted**: ``retain(model, keep)`` removes the model's versions no longer
  held, so a long-running server does not fill its disk one alias move at a
  time.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from pathlib import Path

from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh_sdk.registry import RegistryClient
from mlmesh_sdk.snapshot import UnpackLimits

COMPLETE = ".complete"  # written inside a folder just before its rename


class ArtifactCache:
    def __init__(
        self, root: Path, registry_target: str, limits: UnpackLimits | None = None
    ) -> None:
        self.root = root
        self.registry_target = registry_target
        self.limits = limits or UnpackLimits()
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}

    def path(self, model: str, version: int) -> Path:
        return self.root / model / str(version)

    def holds(self, model: str, version: int) -> bool:
        return (self.path(model, version) / COMPLETE).exists()

    async def folder(self, model: str, version: int) -> Path:
        """The version's folder, downloaded (once, however many ask at once)
        if the cache does not hold it yet."""
        folder = self.path(model, version)
        async with self._locks.setdefault((model, version), asyncio.Lock()):
            if not self.holds(model, version):
                await self._download(model, version, folder)
        return folder

    async def _download(self, model: str, version: int, folder: Path) -> None:
        # Its own name per download: another cache on this folder in this
        # process (another replica) downloads beside it, not into it.
        partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            async with RegistryClient(self.registry_target) as registry:
                await registry.download_folder(
                    ModelReference(model=model, version=version), partial, limits=self.limits
                )
            (partial / COMPLETE).touch()
            await asyncio.to_thread(_move_into_place, partial, folder)
        finally:
            await asyncio.to_thread(shutil.rmtree, partial, True)

    async def retain(self, model: str, keep: set[int] | frozenset[int]) -> list[int]:
        """Removes the model's cached versions not in ``keep``; returns them."""
        return await asyncio.to_thread(self._retain, model, set(keep))

    def _retain(self, model: str, keep: set[int]) -> list[int]:
        removed: list[int] = []
        folder = self.root / model
        if not folder.is_dir():
            return removed
        for entry in folder.iterdir():
            if entry.name.isdigit() and int(entry.name) not in keep:
                # Out of its complete name first: a reader never finds half a folder.
                doomed = entry.with_name(f".{entry.name}.evicted-{os.getpid()}")
                try:
                    entry.rename(doomed)
                except OSError:
                    continue  # another replica evicted it first
                shutil.rmtree(doomed, ignore_errors=True)
                removed.append(int(entry.name))
        return sorted(removed)


def _move_into_place(partial: Path, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.rename(folder)
    except OSError:
        # Another replica finished first, or an incomplete folder from before
        # (no COMPLETE marker) is in the way.
        if (folder / COMPLETE).exists():
            return
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
        folder.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
        partial.rename(folder)

"""Artifact bytes on any fsspec filesystem (a local directory by default).

An upload is written to ``<root>/<model>/<uuid>.partial`` while its sha256 is
computed, renamed to ``.bin`` once verified, and only then recorded in the
database; a failed or cut-off upload deletes its file. Blocking filesystem
calls run in a worker thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import fsspec

log = logging.getLogger("mlmesh.registry.artifacts")


class ArtifactWriter:
    """One upload in progress: bytes in, sha256 and size out."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.partial_path = path
        self.final_path = path.removesuffix(".partial") + ".bin"
        self._file = fs.open(path, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        await asyncio.to_thread(self._write, data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    async def seal(self) -> str:
        """Closes the file and renames it to its final path."""
        await asyncio.to_thread(self._file.close)
        await asyncio.to_thread(self.fs.mv, self.partial_path, self.final_path)
        return self.final_path

    async def discard(self) -> None:
        """Removes whatever was written (partial or sealed)."""

        def _remove() -> None:
            with contextlib.suppress(Exception):
                self._file.close()
            for path in (self.partial_path, self.final_path):
                with contextlib.suppress(FileNotFoundError):
                    if self.fs.exists(path):
                        self.fs.rm(path)

        await asyncio.to_thread(_remove)


class ArtifactStore:
    def __init__(self, url: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)

    async def begin(self, model: str) -> ArtifactWriter:
        directory = f"{self.root}/{model}"

        def _open() -> ArtifactWriter:
            self.fs.makedirs(directory, exist_ok=True)
            return ArtifactWriter(self.fs, f"{directory}/{uuid.uuid4().hex}.partial")

        return await asyncio.to_thread(_open)

    async def read(self, path: str, offset: int, chunk_bytes: int) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(self.fs.open, path, "rb")
        try:
            await asyncio.to_thread(handle.seek, offset)
            while True:
                data = await asyncio.to_thread(handle.read, chunk_bytes)
                if not data:
                    return
                yield data
        finally:
            await asyncio.to_thread(handle.close)

    async def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.fs.rm, path)

    def sweep_partials(self, older_than_s: float = 3600.0) -> int:
        """Deletes uploads left half-written by a crashed process."""
        removed = 0
        now = time.time()
        for path in self.fs.glob(f"{self.root}/*/*.partial"):
            with contextlib.suppress(Exception):
                modified = self.fs.modified(path).timestamp()
                if now - modified > older_than_s:
                    self.fs.rm(path)
                    removed += 1
        if removed:
            log.info("removed %d abandoned partial uploads", removed)
        return removed

"""Artifact bytes on any fsspec filesystem (a local directory by default).

An upload is written to ``<root>/.uploads/<uuid>.partial`` while its sha256 is
computed, moved to ``<root>/<model>/<uuid>.bin`` once verified, and only then
recorded in the database; a failed or cut-off upload deletes its file, and the
model's folder when that leaves it empty (nothing that fails stays on disk).
``.uploads`` cannot clash with a model: model names start with a letter.
Blocking filesystem calls run in a worker thread so the event loop keeps
serving.
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
UPLOADS = ".uploads"


def _remove_if_empty(fs: Any, folder: str) -> None:
    """Removes a folder if nothing is in it (a no-op where folders are not real)."""
    with contextlib.suppress(OSError):
        if fs.exists(folder) and not fs.ls(folder):
            fs.rmdir(folder)


class ArtifactWriter:
    """One upload in progress: bytes in, sha256 and size out."""

    def __init__(self, fs: Any, path: str, final_path: str) -> None:
        self.fs = fs
        self.partial_path = path
        self.final_path = final_path
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

        def _move() -> None:
            for attempt in range(3):
                self.fs.makedirs(self._folder, exist_ok=True)
                try:
                    self.fs.mv(self.partial_path, self.final_path)
                    return
                except FileNotFoundError:
                    # another upload's cleanup removed the (then empty) folder
                    # between our makedirs and mv: make it again
                    if attempt == 2 or not self.fs.exists(self.partial_path):
                        raise

        await asyncio.to_thread(_move)
        return self.final_path

    @property
    def _folder(self) -> str:
        return self.final_path.rsplit("/", 1)[0]

    async def discard(self) -> None:
        """Removes whatever was written (partial or sealed)."""

        def _remove() -> None:
            with contextlib.suppress(Exception):
                self._file.close()
            for path in (self.partial_path, self.final_path):
                with contextlib.suppress(FileNotFoundError):
                    if self.fs.exists(path):
                        self.fs.rm(path)
            _remove_if_empty(self.fs, self._folder)

        await asyncio.to_thread(_remove)


class ArtifactStore:
    def __init__(self, url: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)

    @property
    def uploads(self) -> str:
        return f"{self.root}/{UPLOADS}"

    async def begin(self, model: str) -> ArtifactWriter:
        name = uuid.uuid4().hex

        def _open() -> ArtifactWriter:
            self.fs.makedirs(self.uploads, exist_ok=True)
            return ArtifactWriter(
                self.fs, f"{self.uploads}/{name}.partial", f"{self.root}/{model}/{name}.bin"
            )

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
        # ``*/*.partial``: where uploads were written before ``.uploads``.
        partials = self.fs.glob(f"{self.uploads}/*.partial") + self.fs.glob(
            f"{self.root}/*/*.partial"
        )
        for path in partials:
            with contextlib.suppress(Exception):
                modified = self.fs.modified(path).timestamp()
                if now - modified > older_than_s:
                    self.fs.rm(path)
                    removed += 1
        if removed:
            log.info("removed %d abandoned partial uploads", removed)
        return removed

"""Where jobs read and write: fsspec URIs, the committed parts, atomic writes.

**Which URIs.** A caller names input and output URIs, so a URI is hostile
until checked: ``file://`` paths must lie under one of the service's allowed
roots (resolved, so ``..`` and links cannot leave them), and other protocols
must be listed in the service's settings (``s3``, ``gs``... with their fsspec
package installed).

**Parts.** Output is a directory of ``part-NNNNNN.parquet`` files, failed
rows one of ``part-NNNNNN.jsonl`` files. Each part is written under a
temporary name in ``_tmp/`` and renamed into place (a rename is atomic on a
file system; an object store's put is atomic per object), so a part is
either whole or absent. A part's errors are committed before its rows: a
crash between the two leaves the failed rows recorded and the good ones to
redo, never a row in both.

**Checkpoint.** The ids already written are the id column of every committed
output part plus the ids of every committed errors part: a resumed job skips
them, and its new parts are numbered after the last one.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

PART = re.compile(r"part-(\d{6})\.(parquet|jsonl)")
TMP = "_tmp"
MAX_URI_ECHO = 80


class UriRefused(ValueError):
    """A URI the service will not use (the message says why)."""


@dataclass(frozen=True)
class Location:
    fs: Any  # fsspec.AbstractFileSystem
    path: str  # without the protocol
    uri: str  # normalized

    def join(self, *names: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *names])
        return Location(self.fs, path, _uri(self.fs, path))

    @property
    def local(self) -> bool:
        return "file" in _protocols(self.fs)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _uri(fs: Any, path: str) -> str:
    protocol = _protocols(fs)[0]
    return f"file://{path}" if protocol in ("file", "local") else f"{protocol}://{path}"


def echo(uri: str) -> str:
    """At most a short prefix of a caller's URI, for messages."""
    return uri[:MAX_URI_ECHO] + ("..." if len(uri) > MAX_URI_ECHO else "")


def resolve(uri: str, allowed_roots: Iterable[Path], allowed_protocols: Iterable[str]) -> Location:
    """The location of ``uri``, or UriRefused."""
    if any(ord(c) < 32 for c in uri):
        raise UriRefused("holds a control character")
    parsed = urlparse(uri)
    scheme = parsed.scheme or "file"
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise UriRefused("a file URI names no host (file:///path)")
        raw = parsed.path if parsed.scheme else uri
        if not raw.startswith("/"):
            raise UriRefused("a file path must be absolute")
        path = Path(os.path.realpath(raw))
        roots = [Path(os.path.realpath(root)) for root in allowed_roots]
        if not any(path == root or root in path.parents for root in roots):
            raise UriRefused("is outside the folders this service may use")
        fs = fsspec.filesystem("file")
        return Location(fs, str(path), f"file://{path}")
    if scheme not in set(allowed_protocols):
        raise UriRefused(f"protocol {scheme[:20]!r} is not enabled on this service")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as error:
        raise UriRefused(f"cannot open it: {str(error)[:80]}") from None
    return Location(fs, path, uri)


def input_files(location: Location, suffixes: tuple[str, ...]) -> list[str]:
    """The files of an input: the file itself, or a directory's files with one
    of ``suffixes`` (sorted). Raises FileNotFoundError."""
    fs = location.fs
    if not fs.exists(location.path):
        raise FileNotFoundError(location.path)
    if fs.isdir(location.path):
        files = sorted(
            f
            for f in fs.find(location.path)
            if f.endswith(suffixes) and not Path(f).name.startswith((".", "_"))
        )
        if not files:
            raise FileNotFoundError(f"{location.path}: no {'/'.join(suffixes)} files")
        return files
    return [location.path]


def committed(location: Location, suffix: str) -> dict[int, str]:
    """The committed parts in a directory, by number."""
    fs = location.fs
    if not fs.exists(location.path):
        return {}
    parts = {}
    for entry in fs.ls(location.path, detail=False):
        match = PART.fullmatch(Path(entry).name)
        if match and match.group(2) == suffix:
            parts[int(match.group(1))] = entry
    return parts


def is_empty(location: Location) -> bool:
    """Whether a directory is absent or holds nothing but our temporary folder."""
    fs = location.fs
    if not fs.exists(location.path):
        return True
    if not fs.isdir(location.path):
        return False
    names = {Path(e).name for e in fs.ls(location.path, detail=False)}
    return names <= {TMP}


def written_ids(output: Location, errors: Location, id_column: str) -> tuple[set[Any], int]:
    """(the ids already written, output or errors; the last part number)."""
    ids: set[Any] = set()
    last = 0
    for number, path in committed(output, "parquet").items():
        with output.fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=[id_column])
        ids.update(table.column(id_column).to_pylist())
        last = max(last, number)
    for number, path in committed(errors, "jsonl").items():
        with errors.fs.open(path, "rt") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    # A line that did not parse has no id: where it is.
                    key = record["id"] if record.get("id") is not None else record.get("line")
                    if key is not None:
                        ids.add(key)
        last = max(last, number)
    return ids, last


def _atomic_write(location: Location, name: str, data: bytes) -> None:
    fs = location.fs
    final = location.join(name).path
    if location.local:
        tmp_dir = location.join(TMP).path
        fs.makedirs(tmp_dir, exist_ok=True)
        tmp = f"{tmp_dir}/{name}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        return
    fs.makedirs(location.path, exist_ok=True)
    fs.pipe_file(final, data)  # one object put: whole or absent


def write_part(location: Location, number: int, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    _atomic_write(location, f"part-{number:06d}.parquet", sink.getvalue().to_pybytes())


def write_errors(location: Location, number: int, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row, default=str) + "\n" for row in rows)
    _atomic_write(location, f"part-{number:06d}.jsonl", text.encode())

"""Folders as reproducible artifacts, and the lineage that describes them.

- ``pack_folder``: a folder as a plain (uncompressed) tar whose bytes depend
  only on the files' paths, contents and executable bits: entries sorted by
  path, mtimes, uids and gids zeroed, no owner names. The same folder gives the
  same sha256 on any machine. It is written to a temporary file while hashed,
  so a large folder is never held in memory. No gzip: model weights do not
  compress, and gzip's header would need taming too.
- ``unpack_archive``: the inverse, and the one unpacker every service uses:
  it refuses absolute paths, '..', links, device files and sparse members,
  enforces ``UnpackLimits`` (entries, expanded bytes), and extracts into a
  private staging folder renamed into place, so a failure leaves nothing.
- ``source_snapshot``: per-file sha256 and size, a tree hash, and the git
  revision when the folder is in a git work tree.
- ``environment_lock``: installed distributions as sorted ``name==version``
  lines (a ``pip freeze`` without a subprocess).

Every walk skips ``.git`` directories. A symlink to a file is stored as the
file it points at (Hugging Face caches are made of them); a symlink to a
directory, a dangling link or a special file is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple

from mlmesh.registry.v1.model_pb2 import SourceFile, SourceSnapshot

EXCLUDED_DIRS = frozenset({".git"})
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class _Entry:
    path: str  # relative, '/'-separated
    source: Path
    is_dir: bool


def _walk(root: Path) -> list[_Entry]:
    """Every directory and file under root, sorted by relative path."""
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    entries: list[_Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in dirnames:
            path = Path(dirpath, name)
            if path.is_symlink():
                raise ValueError(f"{path} is a symlink to a directory; it is not followed")
            entries.append(_Entry(path.relative_to(root).as_posix(), path, True))
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_file():
                raise ValueError(f"{path} is not a regular file (a dangling link, a socket...)")
            entries.append(_Entry(path.relative_to(root).as_posix(), path, False))
    entries.sort(key=lambda e: e.path)
    return entries


def file_sha256(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Lowercase hex sha256 and size of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BYTES):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class PackedFolder(NamedTuple):
    """A packed folder: a temporary tar file the caller deletes, its sha256 and size."""

    path: Path
    sha256: str
    size_bytes: int


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.target.write(data)


def _tarinfo(entry: _Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.is_dir:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        st = entry.source.stat()  # follows a symlink to its file
        info.type = tarfile.REGTYPE
        info.mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
        info.size = st.st_size
    return info


def pack_folder(
    path: str | os.PathLike[str], *, temp_dir: str | os.PathLike[str] | None = None
) -> PackedFolder:
    """Packs a folder into a reproducible tar in a temporary file (see the module
    docstring). The caller deletes ``PackedFolder.path``."""
    root = Path(path)
    entries = _walk(root)
    fd, name = tempfile.mkstemp(prefix="mlmesh-", suffix=".tar", dir=temp_dir)
    tar_path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer = _HashingWriter(handle)
            # "w|": a pure stream, so only write() is called on the writer.
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for entry in entries:
                    info = _tarinfo(entry)
                    if entry.is_dir:
                        tar.addfile(info)
                    else:
                        with entry.source.open("rb") as source:
                            tar.addfile(info, source)
        return PackedFolder(tar_path, writer.digest.hexdigest(), writer.size)
    except BaseException:
        tar_path.unlink(missing_ok=True)
        raise


class UnsafeArchiveError(ValueError):
    """An archive that is refused: a member that could escape the destination
    or is not a plain file or folder, or one over the UnpackLimits."""


@dataclass(frozen=True)
class UnpackLimits:
    """How much one archive may expand to. The defaults fit large models."""

    # Files and folders in the archive.
    max_members: int = 100_000
    # Sum of the regular files' sizes once extracted.
    max_total_bytes: int = 64 * 1024**3


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in pure.parts or "\\" in name or "\0" in name:
        raise UnsafeArchiveError(f"archive member {name!r} leaves the destination folder")
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(
            f"archive member {name!r} is not a regular file or directory: a link to "
            f"{member.linkname!r}"
        )
    if member.issparse() or any(key.startswith("GNU.sparse") for key in member.pax_headers):
        # a few KiB of archive that would expand to any size on disk
        raise UnsafeArchiveError(f"archive member {name!r} is a sparse file")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {name!r} is not a regular file or directory")


def _checked_members(tar: tarfile.TarFile, limits: UnpackLimits) -> list[tarfile.TarInfo]:
    """Every member, checked, read one header at a time so that a huge member
    count stops at the limit instead of filling memory."""
    members: list[tarfile.TarInfo] = []
    total = 0
    while (member := tar.next()) is not None:
        if len(members) >= limits.max_members:
            raise UnsafeArchiveError(f"the archive has more than {limits.max_members} entries")
        _check_member(member)
        total += member.size if member.isreg() else 0
        if total > limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"the archive expands to more than {limits.max_total_bytes} bytes"
            )
        members.append(member)
    return members


def unpack_archive(
    tar_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    limits: UnpackLimits | None = None,
) -> None:
    """Extracts a tar made by ``pack_folder`` into dest_dir, all or nothing.

    Every member is checked before anything is written: absolute paths, '..',
    links, device files, sparse members and archives over ``limits`` raise
    UnsafeArchiveError (a ValueError). The files are extracted into a private
    folder (``tempfile.mkdtemp``) beside dest_dir and renamed to dest_dir
    only when complete, so a failure leaves nothing half-written. dest_dir may
    be missing or an empty folder; anything else raises FileExistsError.
    """
    limits = limits or UnpackLimits()
    dest = Path(dest_dir).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_destination(dest)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpacking", dir=dest.parent))
    try:
        try:
            with tarfile.open(tar_path, mode="r:") as tar:
                members = _checked_members(tar, limits)
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: a second line of defence
                    tar.extractall(staging, members=members, filter="data")
                else:  # pragma: no cover
                    tar.extractall(staging, members=members)
        except tarfile.TarError as error:
            raise ValueError(
                f"{tar_path} is not a tar archive made by pack_folder (was the version "
                f"uploaded with upload_file?): {error}"
            ) from error
        staging.chmod(0o755)  # mkdtemp's folder is private (0700)
        check_destination(dest)
        if dest.is_dir():
            dest.rmdir()  # empty (checked): replaced by the complete folder
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_destination(dest: Path) -> None:
    """Refuses a dest_dir unpack_archive cannot fill: a symlink, a file, or a
    folder with something in it (FileExistsError)."""
    if dest.is_symlink():
        raise FileExistsError(f"{dest} is a symlink; refusing to extract through it")
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not an empty folder")


def _git_revision(root: Path) -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip()


def source_snapshot(path: str | os.PathLike[str], revision: str | None = None) -> SourceSnapshot:
    """Identifies a source tree by content.

    ``tree_sha256`` is the sha256 of the sorted ``"<path>\\0<sha256>\\n"`` lines.
    ``revision`` defaults to ``git rev-parse HEAD`` run in the folder (empty
    when it is not in a git work tree or git is missing).
    """
    root = Path(path)
    files: list[SourceFile] = []
    tree = hashlib.sha256()
    for entry in _walk(root):
        if entry.is_dir:
            continue
        digest, size = file_sha256(entry.source)
        files.append(SourceFile(path=entry.path, sha256=digest, size_bytes=size))
        tree.update(f"{entry.path}\0{digest}\n".encode())
    if revision is None:
        revision = _git_revision(root)
    return SourceSnapshot(tree_sha256=tree.hexdigest(), files=files, revision=revision)


def environment_lock() -> str:
    """Installed distributions as sorted ``name==version`` lines."""
    pins: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if not name:
            continue  # a broken install without metadata
        key = re.sub(r"[-_.]+", "-", name).lower()  # PEP 503 normalised
        pins.setdefault(key, f"{name}=={dist.version}")  # the first on sys.path wins
    return "".join(f"{pins[key]}\n" for key in sorted(pins))

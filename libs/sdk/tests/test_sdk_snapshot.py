"""pack_folder / unpack_archive / source_snapshot / environment_lock, offline."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from mlmesh_sdk.snapshot import (
    environment_lock,
    file_sha256,
    pack_folder,
    source_snapshot,
    unpack_archive,
)
from sdk_folders import make_folder, tree_of


def _pack(path: Path) -> tuple[str, int, bytes]:
    packed = pack_folder(path)
    try:
        data = packed.path.read_bytes()
        return packed.sha256, packed.size_bytes, data
    finally:
        packed.path.unlink()


def test_pack_reports_the_sha_and_size_of_its_file(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=10_000)
    sha, size, data = _pack(folder)
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))


def test_pack_is_reproducible_across_copies_and_mtimes(tmp_path: Path) -> None:
    first = make_folder(tmp_path / "a", big_bytes=10_000)
    second = tmp_path / "elsewhere" / "b"
    shutil.copytree(first, second)  # another path, other inode order
    for dirpath, _, filenames in os.walk(second):
        for name in filenames:
            os.utime(Path(dirpath, name), (1_000_000, 1_000_000))
    assert _pack(first)[0] == _pack(second)[0]


def test_pack_depends_on_content_and_exec_bit(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=10_000)
    before = _pack(folder)[0]
    (folder / "run.sh").chmod(0o644)
    after_chmod = _pack(folder)[0]
    (folder / "config.json").write_text('{"seed": 1}\n')
    after_edit = _pack(folder)[0]
    assert len({before, after_chmod, after_edit}) == 3


def test_tar_entries_are_sorted_and_anonymous(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=10_000)
    _, _, data = _pack(folder)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert "empty-dir" in names and "weights/model.bin" in names
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    assert all(m.uname == "" and m.gname == "" for m in members)
    assert {m.name: m.mode for m in members}["run.sh"] == 0o755
    assert {m.name: m.mode for m in members}["config.json"] == 0o644


def test_round_trip(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=100_000)
    packed = pack_folder(folder)
    try:
        unpack_archive(packed.path, tmp_path / "out")
    finally:
        packed.path.unlink()
    assert tree_of(tmp_path / "out") == tree_of(folder)
    assert os.access(tmp_path / "out" / "run.sh", os.X_OK)


def test_git_directories_are_skipped(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=1000)
    before = _pack(folder)[0]
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert _pack(folder)[0] == before
    assert all(not f.path.startswith(".git") for f in source_snapshot(folder).files)


def test_file_symlinks_are_stored_as_files(tmp_path: Path) -> None:
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "model.bin").symlink_to(blob)
    packed = pack_folder(folder)
    try:
        unpack_archive(packed.path, tmp_path / "out")
    finally:
        packed.path.unlink()
    out = tmp_path / "out" / "model.bin"
    assert not out.is_symlink() and out.read_bytes() == b"weights"


def test_directory_symlinks_and_dangling_links_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "loop").symlink_to(folder)
    with pytest.raises(ValueError, match="symlink to a directory"):
        pack_folder(folder)
    (folder / "loop").unlink()
    (folder / "gone").symlink_to(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not a regular file"):
        pack_folder(folder)


def test_pack_needs_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        pack_folder(tmp_path / "f")


def _evil_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w") as tar:
        if member.isreg():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


@pytest.mark.parametrize(
    ("name", "kind", "says"),
    [
        ("../escape.txt", tarfile.REGTYPE, "leaves the destination"),
        ("a/../../escape.txt", tarfile.REGTYPE, "leaves the destination"),
        ("/tmp/absolute.txt", tarfile.REGTYPE, "absolute path"),
        ("link", tarfile.SYMTYPE, "not a regular file"),
        ("hard", tarfile.LNKTYPE, "not a regular file"),
        ("dev", tarfile.CHRTYPE, "not a regular file"),
    ],
)
def test_unpack_refuses_unsafe_members(tmp_path: Path, name: str, kind: bytes, says: str) -> None:
    member = tarfile.TarInfo(name)
    member.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        member.linkname = "/etc/passwd"
    archive = _evil_tar(tmp_path / "evil.tar", member)
    with pytest.raises(ValueError, match=says):
        unpack_archive(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_unpack_of_something_else_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x08\x01" * 1000)
    with pytest.raises(ValueError, match="not a tar archive"):
        unpack_archive(tmp_path / "model.onnx", tmp_path / "out")


def test_source_snapshot_lists_files_and_tree_hash(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "src", big_bytes=5000)
    snapshot = source_snapshot(folder)
    expected = sorted(
        (path, hashlib.sha256(data).hexdigest(), len(data))
        for path, data in tree_of(folder).items()
        if data is not None
    )
    assert [(f.path, f.sha256, f.size_bytes) for f in snapshot.files] == expected
    lines = "".join(f"{path}\0{sha}\n" for path, sha, _ in expected)
    assert snapshot.tree_sha256 == hashlib.sha256(lines.encode()).hexdigest()
    assert snapshot.revision == ""  # a temporary directory is no git work tree


def test_source_snapshot_revision_argument_wins(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "src", big_bytes=10)
    assert source_snapshot(folder, revision="v1.2").revision == "v1.2"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_source_snapshot_reads_the_git_revision(tmp_path: Path) -> None:
    repo = make_folder(tmp_path / "repo", big_bytes=10)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert source_snapshot(repo / "tokenizer").revision == head
    assert len(head) in (40, 64)


def test_file_sha256(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc" * 1_000_000)
    assert file_sha256(tmp_path / "f") == (
        hashlib.sha256(b"abc" * 1_000_000).hexdigest(),
        3_000_000,
    )


def test_environment_lock_is_a_sorted_freeze() -> None:
    lines = environment_lock().splitlines()
    names = [re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() for line in lines]
    assert names == sorted(names)  # by PEP 503 name, as pip freeze sorts
    assert len(names) == len(set(names))
    assert all(line.count("==") == 1 for line in lines)
    assert "grpcio" in names and "mlmesh-sdk" in names

"""The one unpacker: sparse members, limits, atomic extraction, and downloads
that never write through a planted symlink."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from mlmesh_sdk.registry import RegistryClient, UnsafeDestinationError
from mlmesh_sdk.snapshot import UnpackLimits, UnsafeArchiveError, pack_folder, unpack_archive
from sdk_folders import make_folder, tree_of


def _sparse_tar(path: Path, real_size: int) -> Path:
    """A GNU sparse member: one stored byte that extracts to ``real_size`` bytes."""
    info = tarfile.TarInfo("weights.bin")
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 1
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT)[:512])

    def octal(number: int) -> bytes:
        return b"%011o\0" % number

    block[386:398] = octal(real_size - 1)  # the stored byte's offset
    block[398:410] = octal(1)  # and length
    block[483:495] = octal(real_size)  # the expanded size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    path.write_bytes(bytes(block) + b"x" + bytes(511) + bytes(1024))
    return path


def _tar_of(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_sparse_member_is_refused(tmp_path: Path) -> None:
    archive = _sparse_tar(tmp_path / "sparse.tar", 2 * 1024**3)
    assert archive.stat().st_size < 10_000
    with pytest.raises(UnsafeArchiveError, match="sparse"):
        unpack_archive(archive, tmp_path / "out")
    assert _leftovers(tmp_path) == ["sparse.tar"]


def test_the_entry_count_is_limited(tmp_path: Path) -> None:
    archive = _tar_of(tmp_path / "many.tar", {f"f{i}": b"x" for i in range(11)})
    with pytest.raises(UnsafeArchiveError, match="more than 10 entries"):
        unpack_archive(archive, tmp_path / "out", UnpackLimits(max_members=10))
    unpack_archive(archive, tmp_path / "out", UnpackLimits(max_members=11))
    assert len(list((tmp_path / "out").iterdir())) == 11


def test_the_expanded_size_is_limited(tmp_path: Path) -> None:
    archive = _tar_of(tmp_path / "big.tar", {"a": b"x" * 600, "b": b"y" * 600})
    with pytest.raises(UnsafeArchiveError, match="more than 1000 bytes"):
        unpack_archive(archive, tmp_path / "out", UnpackLimits(max_total_bytes=1000))
    assert _leftovers(tmp_path) == ["big.tar"]


def test_a_failed_extraction_leaves_nothing(tmp_path: Path) -> None:
    whole = _tar_of(tmp_path / "whole.tar", {"first": b"1" * 5000, "second": b"2" * 5000})
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:7000])  # the second file's data is cut off
    whole.unlink()
    with pytest.raises(ValueError):
        unpack_archive(cut, tmp_path / "out")
    assert _leftovers(tmp_path) == ["cut.tar"]


def test_the_destination_must_be_missing_or_empty(tmp_path: Path) -> None:
    archive = _tar_of(tmp_path / "a.tar", {"f": b"new"})
    (tmp_path / "empty").mkdir()
    unpack_archive(archive, tmp_path / "empty")
    assert (tmp_path / "empty" / "f").read_bytes() == b"new"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        unpack_archive(archive, tmp_path / "full")
    assert _leftovers(tmp_path / "full") == ["keep"]
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError, match="symlink"):
        unpack_archive(archive, tmp_path / "link")
    assert not (tmp_path / "elsewhere").exists()


async def test_a_download_never_writes_through_a_planted_symlink(
    registry_target: str, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "model", big_bytes=30_000)
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    async with RegistryClient(registry_target) as client:
        version = await client.upload_folder("planted", folder)
        # where earlier SDKs put the archive: a predictable name beside dest
        name = f".model.planted-1-{version.sha256[:16]}.tar.partial"
        (out / name).symlink_to(victim)
        await client.download_folder("planted/1", out / "model")
        assert tree_of(out / "model") == tree_of(folder)
        assert victim.read_bytes() == b""
        assert sorted(p.name for p in out.iterdir()) == [name, "model"]
        # a file download onto a symlink is refused, the target untouched
        (tmp_path / "file.tar").symlink_to(victim)
        for resume in (True, False):
            with pytest.raises(UnsafeDestinationError):
                await client.download("planted/1", tmp_path / "file.tar", resume=resume)
        assert victim.read_bytes() == b""


def test_pack_then_unpack_still_round_trips(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "model", big_bytes=10_000)
    packed = pack_folder(folder)
    try:
        unpack_archive(packed.path, tmp_path / "out")
    finally:
        packed.path.unlink()
    assert tree_of(tmp_path / "out") == tree_of(folder)

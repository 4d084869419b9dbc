"""Progress of uploads and downloads: the SDK's callback against a real
registry, the bar the command line draws, and when it draws it."""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
from pathlib import Path

import pytest
from mlmesh_sdk import cli
from mlmesh_sdk.progress import ProgressBar, human_bytes, render
from mlmesh_sdk.registry import RegistryClient
from sdk_folders import make_folder, tree_of

MLMESH = Path(sys.executable).parent / "mlmesh"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 1024**2, 3 * 1024**4)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 MiB",
        "3072.0 GiB",
    ]


def test_the_line_shows_the_share_the_bytes_the_rate_and_the_time_left() -> None:
    mib = 1024**2
    assert render("upload digits", 0, 24 * mib, 0.0) == (
        "upload digits  [....................]    0%  0/24.0 MiB"
    )
    assert render("upload digits", 12 * mib, 24 * mib, 2.0) == (
        "upload digits  [##########..........]   50%  12.0 MiB/24.0 MiB  6.0 MiB/s  2 s left"
    )
    done = render("download m@champion", 24 * mib, 24 * mib, 150.0)
    assert done.endswith("100%  24.0 MiB/24.0 MiB  163.8 KiB/s  in 2 min 30 s")
    assert render("x", 5, 0, 1.0).startswith("x  [####################]  100%")  # empty artifact
    assert "1 h 05 min left" in render("x", 1, 3901, 1.0)


def test_the_bar_redraws_in_place_at_most_every_interval_and_ends_with_a_newline() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar("upload m", stream, interval_s=0.5, clock=clock)
    bar(0, 1000)
    clock.now += 0.1
    bar(100, 1000)  # too soon: not drawn
    clock.now += 0.5
    bar(600, 1000)
    clock.now += 0.1
    bar(1000, 1000)  # the last one is always drawn
    bar(1000, 1000)  # and only once
    frames = stream.getvalue().split("\r")[1:]
    assert [re.search(r"\d+%", frame)[0] for frame in frames] == ["0%", "60%", "100%"]
    assert all(not frame.endswith("\n") for frame in frames[:-1])
    assert frames[-1].endswith("\n")
    # a shorter line blanks what the longer one before it left
    assert len(frames[2].rstrip("\n")) >= len(frames[1])


async def test_uploads_and_downloads_report_every_byte(
    registry_target: str, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=3 * 1024 * 1024)
    uploaded: list[tuple[int, int]] = []
    downloaded: list[tuple[int, int]] = []
    async with RegistryClient(registry_target) as registry:
        version = await registry.upload_folder(
            "progress-model",
            folder,
            chunk_bytes=1024 * 1024,
            progress=lambda done, total: uploaded.append((done, total)),
        )
        await registry.download_folder(
            "progress-model/1",
            tmp_path / "d",
            progress=lambda done, total: downloaded.append((done, total)),
        )
    for steps in (uploaded, downloaded):
        done = [d for d, _ in steps]
        assert {t for _, t in steps} == {version.size_bytes}
        assert done[0] == 0 and done[-1] == version.size_bytes
        assert done == sorted(done) and len(done) >= 4  # several chunks, in order
    assert tree_of(tmp_path / "d") == tree_of(folder)


async def test_a_resumed_download_starts_its_count_where_the_file_stops(
    registry_target: str, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=1024 * 1024)
    steps: list[int] = []
    async with RegistryClient(registry_target) as registry:
        version = await registry.upload_folder("resume-progress", folder)
        await registry.download("resume-progress/1", tmp_path / "a.tar")
        whole = (tmp_path / "a.tar").read_bytes()
        (tmp_path / "b.tar").write_bytes(whole[:1000])
        await registry.download(
            "resume-progress/1", tmp_path / "b.tar", progress=lambda d, _: steps.append(d)
        )
    assert steps[0] == 1000 and steps[-1] == version.size_bytes
    assert (tmp_path / "b.tar").read_bytes() == whole


@pytest.mark.parametrize(
    ("argv", "tty", "shown"),
    [
        (["upload", "m", "f"], True, True),
        (["upload", "m", "f"], False, False),
        (["--json", "upload", "m", "f"], True, False),
        (["upload", "m", "f", "--json"], True, False),
        (["upload", "m", "f", "--no-progress"], True, False),
        (["upload", "m", "f", "--progress"], False, True),
        (["--json", "--progress", "upload", "m", "f"], False, True),
    ],
)
def test_the_bar_shows_on_a_terminal_without_json_or_when_asked(
    argv: list[str], tty: bool, shown: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    args = cli.build_parser().parse_args(argv)
    assert isinstance(cli._progress(args, "upload m"), ProgressBar) is shown


async def test_the_command_draws_the_bar_on_stderr_and_keeps_stdout_clean(
    registry_target: str, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=2 * 1024 * 1024)
    env = {**os.environ, "MLMESH_TARGET": registry_target}
    outputs = []
    for argv in (
        ["upload", "bar-model", str(folder), "--progress"],
        ["download", "bar-model/1", str(tmp_path / "d"), "--progress"],
        ["download", "bar-model/1", str(tmp_path / "e")],  # stderr is a pipe: no bar
    ):
        process = await asyncio.create_subprocess_exec(
            str(MLMESH),
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err
        outputs.append((out.decode(), err.decode()))
    (up_out, up_err), (down_out, down_err), (quiet_out, quiet_err) = outputs
    assert up_out.startswith("bar-model/1  sha256:") and len(up_out.splitlines()) == 1
    assert up_err.startswith("\rupload bar-model  [") and up_err.endswith("\n")
    assert "100%" in up_err.split("\r")[-1] and "MiB/s" in up_err.split("\r")[-1]
    assert down_out.startswith("bar-model/1  sha256:")
    assert down_err.startswith("\rdownload bar-model/1  [") and "100%" in down_err
    assert quiet_err == "" and quiet_out == down_out

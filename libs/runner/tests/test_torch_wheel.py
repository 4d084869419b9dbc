"""scripts/torch-wheel.sh (mlmesh_runner.torchwheel): where torch's CPU build
comes from, and that only the pinned file ever lands in wheels/. Offline: a
PEP 503 index on loopback serves a small stand-in file under its own pin."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlmesh_runner import torchwheel
from mlmesh_runner.torchwheel import Pin, WheelError, ensure

ROOT = Path(__file__).resolve().parents[3]
BODY = b"a stand-in for torch's CPU wheel\n" * 4096
NAME = "torch-9.9.9+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
PIN = Pin(NAME, hashlib.sha256(BODY).hexdigest(), len(BODY))
HREF = "/whl/cpu/torch-9.9.9%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl"


@dataclass
class Index:
    """What the loopback index serves, and what it was asked for."""

    page: str = ""
    body: bytes = BODY
    # "trickle": one byte every 0.2 s; "cut": half the body, then close.
    mode: str = ""
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def listing(self, href: str = HREF, digest: str | None = PIN.sha256) -> None:
        fragment = f"#sha256={digest}" if digest else ""
        self.page = (
            "<!DOCTYPE html><html><body><h1>Links for torch</h1>\n"
            '<a href="/whl/cpu/torch-9.9.8%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl">'
            "torch-9.9.8+cpu-cp311-cp311-manylinux_2_28_x86_64.whl</a><br/>\n"
            f'<a href="{href}{fragment}" data-requires-python="&gt;=3.10">{NAME}</a><br/>\n'
            "</body></html>\n"
        )


@pytest.fixture
def index() -> Iterator[Index]:
    state = Index()
    state.listing()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:
            state.requests.append(self.path)
            try:
                if self.path == "/whl/cpu/torch/":
                    self._send(state.page.encode(), "text/html")
                elif self.path == HREF:
                    self._file()
                else:
                    self.send_error(404)
            except OSError:  # the client gave up (the timeout test)
                pass

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self) -> None:
            if state.mode == "":
                self._send(state.body, "application/octet-stream")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            if state.mode == "cut":
                self.wfile.write(state.body[: len(state.body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            for byte in state.body[:50]:  # trickle
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"


def _files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _ensure(dest: Path, **kwargs: object) -> str:
    options: dict[str, object] = {"pin": PIN, "timeout_s": 10.0, "attempts": 1, "log": print}
    options.update(kwargs)
    return ensure(dest, **options)  # type: ignore[arg-type]


def test_downloads_the_pinned_file_from_the_index(tmp_path: Path, index: Index) -> None:
    dest = tmp_path / "wheels"
    source = _ensure(dest, wheel_dir=str(tmp_path / "empty"), index_url=index.url)
    assert source == index.url.rsplit("/whl", 1)[0] + HREF
    assert (dest / NAME).read_bytes() == BODY
    assert _files(dest) == [NAME]
    assert index.requests == ["/whl/cpu/torch/", HREF]
    # A second run finds it in place: nothing is fetched.
    assert _ensure(dest, wheel_dir=None, index_url=index.url) == "present"
    assert index.requests == ["/whl/cpu/torch/", HREF]


def test_a_bad_sha256_is_refused_and_nothing_is_left(tmp_path: Path, index: Index) -> None:
    index.listing(digest=None)  # the page publishes no digest: the download is checked
    index.body = b"X" * len(BODY)
    dest = tmp_path / "wheels"
    with pytest.raises(WheelError) as refused:
        _ensure(dest, wheel_dir=str(tmp_path / "empty"), index_url=index.url)
    message = str(refused.value)
    assert (
        f"sha256 {hashlib.sha256(index.body).hexdigest()}, not the pinned {PIN.sha256}" in message
    )
    assert str(tmp_path / "empty" / NAME) in message  # every source tried is named
    assert "127.0.0.1" in message
    assert _files(dest) == []


def test_a_digest_the_index_publishes_otherwise_is_refused_unread(
    tmp_path: Path, index: Index
) -> None:
    index.listing(digest="0" * 64)
    dest = tmp_path / "wheels"
    with pytest.raises(WheelError, match=r"the index publishes sha256 0{64}"):
        _ensure(dest, wheel_dir=None, index_url=index.url)
    assert index.requests == ["/whl/cpu/torch/"]
    assert _files(dest) == []


def test_a_larger_file_is_cut_off_and_refused(tmp_path: Path, index: Index) -> None:
    index.listing(digest=None)
    index.body = BODY + b"more"
    dest = tmp_path / "wheels"
    with pytest.raises(WheelError, match=f"more than {PIN.size}"):
        _ensure(dest, wheel_dir=None, index_url=index.url)
    assert _files(dest) == []


def test_a_cut_download_leaves_nothing(tmp_path: Path, index: Index) -> None:
    index.mode = "cut"
    dest = tmp_path / "wheels"
    with pytest.raises(WheelError, match="IncompleteRead"):
        _ensure(dest, wheel_dir=None, index_url=index.url, attempts=2)
    assert index.requests.count(HREF) == 2  # a broken transfer is retried
    assert _files(dest) == []


def test_a_stalled_download_is_bounded_by_the_timeout(tmp_path: Path, index: Index) -> None:
    index.mode = "trickle"
    dest = tmp_path / "wheels"
    started = time.monotonic()
    with pytest.raises(WheelError, match="gave up after 1 s"):
        _ensure(dest, wheel_dir=None, index_url=index.url, timeout_s=1.0, attempts=3)
    assert time.monotonic() - started < 5
    assert _files(dest) == []


def test_the_local_folder_wins_over_the_index(tmp_path: Path, index: Index) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / NAME).write_bytes(BODY)
    dest = tmp_path / "wheels"
    assert _ensure(dest, wheel_dir=str(local), index_url=index.url) == str(local / NAME)
    assert (dest / NAME).read_bytes() == BODY
    assert index.requests == []


def test_a_corrupt_local_file_falls_back_to_the_index(tmp_path: Path, index: Index) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / NAME).write_bytes(b"Y" * len(BODY))
    dest = tmp_path / "wheels"
    assert _ensure(dest, wheel_dir=str(local), index_url=index.url).endswith(HREF)
    assert (dest / NAME).read_bytes() == BODY


def test_a_wrong_file_in_wheels_is_replaced(tmp_path: Path, index: Index) -> None:
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / NAME).write_bytes(b"stale")
    (dest / f"{torchwheel.PART_PREFIX}left-over{torchwheel.PART_SUFFIX}").write_bytes(b"half")
    assert _ensure(dest, wheel_dir=None, index_url=index.url).endswith(HREF)
    assert (dest / NAME).read_bytes() == BODY
    assert _files(dest) == [NAME]  # an interrupted run's temporary file is gone too


def test_a_symlink_in_wheels_is_replaced_by_the_file(tmp_path: Path, index: Index) -> None:
    elsewhere = tmp_path / "elsewhere.whl"
    elsewhere.write_bytes(BODY)
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / NAME).symlink_to(elsewhere)
    _ensure(dest, wheel_dir=None, index_url=index.url)
    assert not (dest / NAME).is_symlink()
    assert (dest / NAME).read_bytes() == BODY


def test_only_http_links_are_followed(tmp_path: Path, index: Index) -> None:
    stolen = tmp_path / NAME
    stolen.write_bytes(BODY)
    index.listing(href=stolen.as_uri())
    with pytest.raises(WheelError, match=f"its page lists no {re.escape(NAME)}"):
        _ensure(tmp_path / "wheels", wheel_dir=None, index_url=index.url)
    with pytest.raises(WheelError, match="not an http"):
        _ensure(tmp_path / "wheels", wheel_dir=None, index_url=tmp_path.as_uri())


def test_every_source_tried_is_named(tmp_path: Path) -> None:
    url = _closed_port_url()
    with pytest.raises(WheelError) as refused:
        _ensure(tmp_path / "wheels", wheel_dir=str(tmp_path / "none"), index_url=url)
    message = str(refused.value)
    assert f"{tmp_path / 'none' / NAME}: no such file" in message
    assert f"{url}: " in message
    assert "Connection refused" in message
    with pytest.raises(WheelError) as skipped:
        _ensure(tmp_path / "wheels", wheel_dir="", index_url="")
    assert "MLMESH_WHEEL_DIR is empty" in str(skipped.value)
    assert "MLMESH_TORCH_INDEX_URL is empty" in str(skipped.value)


def test_credentials_in_the_index_url_are_never_printed(tmp_path: Path) -> None:
    url = _closed_port_url().replace("http://", "http://user:s3cret@")
    with pytest.raises(WheelError) as refused:
        _ensure(tmp_path / "wheels", wheel_dir=None, index_url=url)
    assert "s3cret" not in str(refused.value)


def _script(dest: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "torch-wheel.sh"), "--dest", str(dest)],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_script_fails_plainly_without_a_source(tmp_path: Path) -> None:
    url = _closed_port_url()
    done = _script(
        tmp_path / "wheels",
        MLMESH_WHEEL_DIR=str(tmp_path),
        MLMESH_TORCH_INDEX_URL=url,
        MLMESH_TORCH_TIMEOUT="1",
    )
    assert done.returncode == 1
    assert torchwheel.PIN.filename in done.stderr
    assert str(tmp_path / torchwheel.PIN.filename) in done.stderr
    assert url in done.stderr


@pytest.mark.parametrize("timeout", ["nan", "inf", "-1", "0", "1e9", "soon"])
def test_an_unbounded_or_malformed_timeout_is_refused(tmp_path: Path, timeout: str) -> None:
    """nan or inf would remove the overall deadline of a download."""
    done = _script(
        tmp_path / "wheels",
        MLMESH_WHEEL_DIR="",
        MLMESH_TORCH_INDEX_URL=_closed_port_url(),
        MLMESH_TORCH_TIMEOUT=timeout,
    )
    assert done.returncode == 2
    assert "MLMESH_TORCH_TIMEOUT" in done.stderr
    assert not (tmp_path / "wheels").exists() or _files(tmp_path / "wheels") == []


def test_the_script_accepts_the_real_wheel(tmp_path: Path) -> None:
    """The pin is the file set-up put in wheels/ (hard-linked, not copied)."""
    real = ROOT / "wheels" / torchwheel.PIN.filename
    if not real.is_file():
        pytest.skip("wheels/ holds no torch wheel (set-up not run)")
    dest = tmp_path / "wheels"
    dest.mkdir()
    try:
        os.link(real, dest / real.name)
    except OSError:
        pytest.skip("wheels/ is on another file system")
    done = _script(dest, MLMESH_WHEEL_DIR="", MLMESH_TORCH_INDEX_URL="")
    assert done.returncode == 0, done.stderr
    assert _files(dest) == [real.name]


def test_the_pin_is_the_locks_torch() -> None:
    """uv.lock, the side environments' requirements and this pin name the
    same torch CPU file, and the lock finds it in wheels/."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    (torch,) = [package for package in lock["package"] if package["name"] == "torch"]
    assert torch["source"] == {"registry": "wheels"}
    assert [wheel["path"] for wheel in torch["wheels"]] == [torchwheel.PIN.filename]
    version = torchwheel.PIN.filename.split("-")[1]
    assert torch["version"] == version
    assert version.endswith("+cpu")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["uv"]["find-links"] == ["wheels"]
    for requirements in (
        ROOT / "services" / "llm" / "vllm-requirements.txt",
        ROOT / "services" / "triton" / "models-requirements.txt",
    ):
        pins = re.findall(r"^torch==(\S+)", requirements.read_text(), re.MULTILINE)
        assert pins == [version], requirements

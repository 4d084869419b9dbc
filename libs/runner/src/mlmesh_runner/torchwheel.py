"""Puts torch's CPU build into ``wheels/``, where the lock looks for it.

uv.lock takes ``torch==2.13.0+cpu`` from ``wheels/`` in the checkout (the
``find-links`` entry in pyproject.toml): PyPI's torch is a multi-GB CUDA
build, and PyPI cannot hold a ``+cpu`` build at all. This fills that folder,
from the first of these sources that has the exact file:

1. ``wheels/`` itself, when the file there has the pinned sha256 (nothing done);
2. a local wheel folder (``MLMESH_WHEEL_DIR``, default ``/opt/wheels``; empty:
   skipped), copied;
3. the PyTorch CPU index (``MLMESH_TORCH_INDEX_URL``, default
   https://download.pytorch.org/whl/cpu; empty: skipped): its PEP 503 page
   ``<index>/torch/`` names the file, which is downloaded, bounded by
   ``MLMESH_TORCH_TIMEOUT`` seconds (default 1800) in all.

Whatever the source, the file is written to a temporary name in ``wheels/``,
its sha256 checked against the pin, and only then renamed into place: a
wrong, truncated or oversized file is never left where uv would take it.
A file in ``wheels/`` with another digest is removed and fetched again.

Standard library only: scripts/setup.sh runs it (through
scripts/torch-wheel.sh) with the machine's Python before .venv exists.

    python3.11 -P libs/runner/src/mlmesh_runner/torchwheel.py [--dest wheels]

The pin (``PIN``) is the wheel PyTorch publishes on its CPU index. It could
not be read from download.pytorch.org here (that host is not reachable from
the machine this was written on); the digest is that of the file in this
machine's /opt/wheels, and several independent public projects record the
same digest for this file name as the one the PyTorch CPU index lists
(docs/deploy.md, "Where torch comes from"). It is corroborated, not checked
first-hand against download.pytorch.org.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import http.client
import math
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class Pin:
    """One wheel file: its exact name, sha256 and size in bytes."""

    filename: str
    sha256: str
    size: int

    @property
    def project(self) -> str:
        return self.filename.split("-", 1)[0].lower().replace("_", "-")


# uv.lock's torch (tests/test_torch_wheel.py holds the two together).
PIN = Pin(
    filename="torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256="6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b",
    size=191_794_682,
)
DEFAULT_WHEEL_DIR = "/opt/wheels"
DEFAULT_INDEX_URL = "https://download.pytorch.org/whl/cpu"
DEFAULT_TIMEOUT_S = 1800.0
# One read of the network may wait this long (less when the deadline is nearer).
SOCKET_TIMEOUT_S = 60.0
# A simple page larger than this is refused (PyTorch's torch page is ~1 MB).
MAX_PAGE_BYTES = 64 << 20
CHUNK = 1 << 20
ATTEMPTS = 3
PART_PREFIX = ".torchwheel-"
PART_SUFFIX = ".part"


class WheelError(RuntimeError):
    """No source gave the pinned file; the message names each source tried."""


class _Refused(Exception):
    """A source's file is not the pinned one (not worth retrying)."""


Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure(
    dest: Path,
    *,
    pin: Pin = PIN,
    wheel_dir: str | None = DEFAULT_WHEEL_DIR,
    index_url: str | None = DEFAULT_INDEX_URL,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    attempts: int = ATTEMPTS,
    log: Log = _stderr,
) -> str:
    """Makes ``dest/<pin.filename>`` the pinned file; returns where it came
    from ("present", the local folder, or the file's URL). Raises WheelError
    naming every source tried when none had it."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / pin.filename
    with _Locked(dest):
        _remove_parts(dest)
        tried: list[str] = []
        if target.is_symlink():  # never trusted: where it points may change
            log(f"{target}: a symbolic link; replacing it with the file")
            target.unlink()
            tried.append(f"{target}: a symbolic link (removed)")
        elif target.is_file():
            if target.stat().st_size == pin.size and sha256_of(target) == pin.sha256:
                return "present"
            log(f"{target}: not the pinned file (sha256 differs); fetching it again")
            target.unlink()
            tried.append(f"{target}: sha256 differs (removed)")
        elif target.exists():
            raise WheelError(f"{target} exists and is not a file: remove it")
        if wheel_dir:
            source = Path(wheel_dir) / pin.filename
            try:
                with source.open("rb") as file:
                    _write_verified(dest, target, pin, lambda sink: _copy(file, sink, pin))
            except FileNotFoundError:
                tried.append(f"{source}: no such file")
            except (_Refused, OSError) as error:
                tried.append(f"{source}: {error}")
            else:
                log(f"torch wheel: copied {source} (sha256 ok)")
                return str(source)
        else:
            tried.append("local wheel folder: skipped (MLMESH_WHEEL_DIR is empty)")
        if index_url:
            try:
                url = _from_index(dest, target, pin, index_url, timeout_s, attempts)
            except (_Refused, OSError, ValueError) as error:
                tried.append(f"{_redact(index_url)}: {error}")
            else:
                log(f"torch wheel: downloaded {_redact(url)} (sha256 ok)")
                return url
        else:
            tried.append("PyTorch CPU index: skipped (MLMESH_TORCH_INDEX_URL is empty)")
        raise WheelError(
            f"torch's CPU build {pin.filename} (sha256 {pin.sha256}) was found nowhere:\n"
            + "\n".join(f"  - {line}" for line in tried)
            + "\nPut the file in a folder named by MLMESH_WHEEL_DIR, or let "
            "MLMESH_TORCH_INDEX_URL name a reachable PyTorch CPU index (or a mirror of it)."
        )


class _Locked:
    """Holds an exclusive lock on the folder (two set-ups at once take turns)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)  # releases the lock


def _remove_parts(dest: Path) -> None:
    """Temporary files an interrupted run left (under the lock: none is live)."""
    for part in dest.glob(f"{PART_PREFIX}*{PART_SUFFIX}"):
        part.unlink(missing_ok=True)


def _write_verified(dest: Path, target: Path, pin: Pin, fill: Callable[[BinaryIO], None]) -> None:
    """Writes through ``fill`` to a temporary file in ``dest``; renames it to
    ``target`` only when its size and sha256 are the pin's. The temporary
    file is gone afterwards, whatever happened."""
    fd, name = tempfile.mkstemp(prefix=PART_PREFIX, suffix=PART_SUFFIX, dir=dest)
    part = Path(name)
    try:
        with os.fdopen(fd, "wb") as sink:
            fill(sink)
            sink.flush()
            os.fsync(sink.fileno())
        size = part.stat().st_size
        if size != pin.size:
            raise _Refused(f"{size} bytes, not the pinned {pin.size}")
        digest = sha256_of(part)
        if digest != pin.sha256:
            raise _Refused(f"sha256 {digest}, not the pinned {pin.sha256}")
        part.chmod(0o644)
        os.replace(part, target)
        _fsync_dir(dest)
    finally:
        part.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(source: BinaryIO, sink: BinaryIO, pin: Pin) -> None:
    copied = 0
    for chunk in iter(lambda: source.read(CHUNK), b""):
        copied += len(chunk)
        if copied > pin.size:
            raise _Refused(f"larger than the pinned {pin.size} bytes")
        sink.write(chunk)


def _redact(url: str) -> str:
    """The URL without credentials, query or fragment (for messages)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _check_http(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {_redact(url)!r}")


def _opener() -> urllib.request.OpenerDirector:
    """http(s) only (no file: or ftp:, even through a redirect); proxies
    from the environment, as pip and uv honour them."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"gave up after {self.seconds:g} s (MLMESH_TORCH_TIMEOUT)")
        return left

    def socket_timeout(self) -> float:
        return min(SOCKET_TIMEOUT_S, self.left())


def _read(
    response: http.client.HTTPResponse, deadline: _Deadline, limit: int, sink: BinaryIO | None
) -> bytes:
    """The body, a network read at a time (read1: a trickling server cannot
    hold one read past the deadline), refused past ``limit`` bytes."""
    body = bytearray()
    total = 0
    while True:
        deadline.left()
        chunk = response.read1(CHUNK)
        if not chunk:
            if response.length:  # closed before Content-Length bytes came
                raise http.client.IncompleteRead(b"", response.length)
            return bytes(body)
        total += len(chunk)
        if total > limit:
            raise _Refused(f"more than {limit} bytes")
        if sink is None:
            body += chunk
        else:
            sink.write(chunk)


def _get(url: str, deadline: _Deadline, limit: int, sink: BinaryIO | None = None) -> bytes:
    _check_http(url)
    request = urllib.request.Request(
        url, headers={"Accept": "text/html", "User-Agent": "mlmesh-torchwheel"}
    )
    with _opener().open(request, timeout=deadline.socket_timeout()) as response:
        final = response.geturl()
        _check_http(final)
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _Refused(f"{_redact(final)} is {length} bytes, more than {limit}")
        return _read(response, deadline, limit, sink)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(value for name, value in attrs if name == "href" and value)


def find_link(page: str, page_url: str, pin: Pin) -> str:
    """The URL the PEP 503 ``page`` gives for the pinned file (absolute,
    http(s)); _Refused when it lists no such file or publishes another
    sha256 for it."""
    links = _Links()
    links.feed(page)
    for href in links.hrefs:
        url = urllib.parse.urljoin(page_url, href)
        parts = urllib.parse.urlsplit(url)
        name = urllib.parse.unquote(parts.path.rsplit("/", 1)[-1])
        if name != pin.filename:
            continue
        if parts.scheme not in ("http", "https"):
            continue
        published = urllib.parse.parse_qs(parts.fragment).get("sha256", [""])[0].lower()
        if published and published != pin.sha256:
            raise _Refused(f"the index publishes sha256 {published}, not the pinned {pin.sha256}")
        return urllib.parse.urlunsplit(parts._replace(fragment=""))
    raise _Refused(f"its page lists no {pin.filename}")


def _from_index(
    dest: Path, target: Path, pin: Pin, index_url: str, timeout_s: float, attempts: int
) -> str:
    _check_http(index_url)
    page_url = index_url.rstrip("/") + f"/{pin.project}/"
    deadline = _Deadline(timeout_s)
    failures: list[str] = []
    for attempt in range(1, max(attempts, 1) + 1):
        try:
            page = _get(page_url, deadline, MAX_PAGE_BYTES).decode("utf-8", "replace")
            url = find_link(page, page_url, pin)

            def download(sink: BinaryIO, url: str = url) -> None:
                _get(url, deadline, pin.size, sink)

            _write_verified(dest, target, pin, download)
            return url
        except _Refused:
            raise
        except urllib.error.HTTPError as error:
            error.close()
            failures.append(f"HTTP {error.code} for {_redact(error.url or page_url)}")
            if error.code < 500 and error.code != 429:
                break
        except (OSError, ValueError, http.client.HTTPException) as error:  # timeouts, resets
            reason = getattr(error, "reason", None) or error
            failures.append(f"{type(error).__name__}: {reason}")
            if isinstance(error, TimeoutError) and "MLMESH_TORCH_TIMEOUT" in str(error):
                break
        if attempt < attempts:
            try:
                time.sleep(min(1.0 * attempt, deadline.left()))
            except TimeoutError as error:
                failures.append(str(error))
                break
    raise OSError(errno.EIO, "; ".join(failures))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dest",
        type=Path,
        default=Path(__file__).resolve().parents[4] / "wheels",
        help="the folder uv.lock's find-links names (default: wheels/ in this checkout)",
    )
    args = parser.parse_args(argv)
    env = os.environ
    try:
        timeout_s = float(env.get("MLMESH_TORCH_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        timeout_s = -1.0
    # nan or inf would remove the overall deadline
    if not (math.isfinite(timeout_s) and 0 < timeout_s <= 86_400):
        _stderr("MLMESH_TORCH_TIMEOUT must be a number of seconds in (0, 86400]")
        return 2
    try:
        ensure(
            args.dest,
            wheel_dir=env.get("MLMESH_WHEEL_DIR", DEFAULT_WHEEL_DIR),
            index_url=env.get("MLMESH_TORCH_INDEX_URL", DEFAULT_INDEX_URL),
            timeout_s=timeout_s,
        )
    except WheelError as error:
        _stderr(str(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

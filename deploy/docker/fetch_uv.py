"""Fetches uv's Linux x86-64 wheel from PyPI, checks its sha256 and unpacks the
``uv`` binary: for bases without pip (the debootstrap base has none).

    python3.11 fetch_uv.py DEST_DIR

The URL and digest come from the environment (UV_WHEEL_URL, UV_WHEEL_SHA256),
set by the Dockerfile's build arguments; a digest mismatch aborts the build.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import sys
import urllib.request
import zipfile
from pathlib import Path

MAX_BYTES = 200 * 1024 * 1024


def main() -> None:
    url = os.environ["UV_WHEEL_URL"]
    digest = os.environ["UV_WHEEL_SHA256"].lower()
    if not url.startswith("https://"):
        sys.exit(f"fetch_uv: refusing a non-https URL: {url!r}")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        sys.exit("fetch_uv: UV_WHEEL_SHA256 is not a sha256 hex digest")
    dest = Path(sys.argv[1])
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        sys.exit("fetch_uv: the wheel is larger than expected")
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        sys.exit(f"fetch_uv: sha256 mismatch: got {got}, want {digest}")
    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        names = [n for n in wheel.namelist() if n.endswith(".data/scripts/uv")]
        if len(names) != 1:
            sys.exit(f"fetch_uv: no single uv binary in the wheel: {names}")
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / "uv"
        target.write_bytes(wheel.read(names[0]))
    target.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    print(f"uv unpacked to {target}")


if __name__ == "__main__":
    main()

"""The README's two commands work a second time in the same checkout: set-up
under make (where PATH starts with the venv's bin, whose python has neither
pip nor uv) finds everything in place and changes nothing. CI runs the suite
after a first set-up, so this is the second."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_setup_under_make_works_and_changes_nothing():
    stamp = ROOT / "libs/contracts/src/mlmesh/.generated"
    stamp_before = stamp.stat().st_mtime_ns
    lock_before = (ROOT / "uv.lock").read_bytes()
    started = time.monotonic()
    done = subprocess.run(
        ["make", "--no-print-directory", "setup"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No module named" not in done.stderr
    assert "contracts generated" not in done.stdout  # nothing to regenerate
    assert stamp.stat().st_mtime_ns == stamp_before
    assert (ROOT / "uv.lock").read_bytes() == lock_before  # --frozen: the lock as committed
    assert time.monotonic() - started < 120

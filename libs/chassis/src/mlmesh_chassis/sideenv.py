"""Pinned side environments: a program whose pins clash with the services'
.venv (PyFlink, Phoenix) gets a virtual environment of its own under
``.envs/<name>``, as it gets an image of its own in production.

It holds exactly a compiled requirements file (``uv pip sync``) and a stamp,
``provisioned.json``, with that file's sha256 and the Python version: a
second provision with the same pins does nothing, changed pins re-sync.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STAMP = "provisioned.json"


def uv_command() -> list[str]:
    """uv on PATH, else the running Python's ``-m uv``."""
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


@dataclass(frozen=True)
class SideEnvironment:
    """One pinned environment: its requirements and a check that it works."""

    requirements: Path
    # Runs after a sync with the environment's folder: raises if it is broken.
    check: Callable[[Path], None]
    # Where uv runs (the workspace root: its uv settings apply).
    cwd: Path
    python: str = "3.11"

    def wanted(self) -> dict[str, str]:
        """What the environment is made of: a change to it re-provisions."""
        return {
            "requirements_sha256": hashlib.sha256(self.requirements.read_bytes()).hexdigest(),
            "python": self.python,
        }

    def provisioned(self, env: Path) -> bool:
        """Whether ``env`` holds exactly the pinned environment."""
        try:
            return bool(json.loads((env / STAMP).read_text()) == self.wanted())
        except (OSError, ValueError):
            return False

    def provision(self, env: Path) -> None:
        """Creates or updates the environment at ``env``. Idempotent and quick
        when it already holds the pinned set."""
        if self.provisioned(env):
            return
        stamp = env / STAMP
        stamp.unlink(missing_ok=True)
        python = env / "bin" / "python"
        uv = uv_command()
        if not python.exists():
            subprocess.run([*uv, "venv", "--quiet", "--python", self.python, str(env)], check=True)
        # Exactly the compiled set (it is complete): pip sync removes the rest.
        subprocess.run(
            [*uv, "pip", "sync", "--quiet", "--python", str(python), str(self.requirements)],
            check=True,
            cwd=self.cwd,
        )
        self.check(env)
        stamp.write_text(json.dumps(self.wanted()))

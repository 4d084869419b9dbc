"""Provisions the trace store's environment: Arize Phoenix.

Phoenix pins its own grpcio, opentelemetry-proto, sqlalchemy, pandas and
fastapi, so it gets an environment of its own, apart from the services'
.venv (as it gets its own image in production):

    .envs/phoenix/                python3.11 virtual environment
        arize-phoenix 20.26.1     from phoenix-requirements.txt, exactly
        provisioned.json          the pins' sha256; a second run with the
                                  same pins does nothing

    python -m mlmesh_runner.phoenixenv [--env .envs/phoenix]

`mlmesh-run --observe` runs ``.envs/phoenix/bin/phoenix serve`` (observe.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
REQUIREMENTS = ROOT / "libs" / "runner" / "phoenix-requirements.txt"
PYTHON = "3.11"
DEFAULT_ENV = ROOT / ".envs" / "phoenix"


def _uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def _wanted() -> dict[str, str]:
    """What the environment is made of: a change to it re-provisions."""
    return {
        "requirements_sha256": hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest(),
        "python": PYTHON,
    }


def provisioned(env: Path = DEFAULT_ENV) -> bool:
    """Whether ``env`` holds exactly the pinned environment."""
    try:
        return bool(json.loads((env / "provisioned.json").read_text()) == _wanted())
    except (OSError, ValueError):
        return False


def phoenix_bin(env: Path = DEFAULT_ENV) -> Path:
    """The ``phoenix`` command in ``env``."""
    return env / "bin" / "phoenix"


def provision(env: Path = DEFAULT_ENV) -> None:
    """Creates or updates the environment at ``env``. Idempotent and quick
    when it already holds the pinned set."""
    if provisioned(env):
        return
    stamp = env / "provisioned.json"
    stamp.unlink(missing_ok=True)
    python = env / "bin" / "python"
    if not python.exists():
        subprocess.run([*_uv(), "venv", "--quiet", "--python", PYTHON, str(env)], check=True)
    subprocess.run(
        [*_uv(), "pip", "sync", "--quiet", "--python", str(python), str(REQUIREMENTS)],
        check=True,
        cwd=ROOT,
    )
    # A cheap check that the server imports.
    subprocess.run(
        [str(python), "-c", "import phoenix.server.main"], check=True, capture_output=True
    )
    stamp.write_text(json.dumps(_wanted()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env", type=Path, default=DEFAULT_ENV)
    args = parser.parse_args()
    provision(args.env)
    print(f"the Phoenix environment is in {args.env}")


if __name__ == "__main__":
    main()

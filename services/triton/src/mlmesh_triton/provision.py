"""Provisions a Triton Inference Server from the `nvidia-pytriton` wheel.

The wheel carries a CPU-capable `tritonserver` binary, its shared libraries,
the python backend and its stubs. We extract them (the wheel is never
installed into the services' environment: it pins numpy<2) into

    <dest>/bin/tritonserver
    <dest>/lib/                      the wheel's bundled shared libraries
    <dest>/backends/python/          libtriton_python.so, the backend utils,
                                     and the stub for this Python (3.11)

and build the models' own environment (numpy<2, torch CPU, transformers) at
<models-env>, on the Debian python3.11 whose libpython the stub embeds.

    python -m mlmesh_triton.provision --dest .envs/triton --models-env .envs/triton-models
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PYTRITON = "nvidia-pytriton==0.7.0"
STUB_PYTHON = "3.11"
REQUIREMENTS = Path(__file__).resolve().parents[2] / "models-requirements.txt"
# torch's CPU build, where the services' lock takes it from too: wheels/ in
# this checkout, which scripts/setup.sh fills (scripts/torch-wheel.sh) before
# this runs. The requirements pin ``torch==2.13.0+cpu``: PyPI holds no ``+cpu``
# build, so PyPI's CUDA torch can never be taken instead.
WHEELS = Path(__file__).resolve().parents[4] / "wheels"


def _uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def provision_server(dest: Path) -> Path:
    stamp = dest / "provisioned.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("wheel") == PYTRITON:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        # uv fetches the wheel (cached) and lays its files out; nothing is
        # installed into any environment.
        subprocess.run(
            [
                *_uv(),
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                tmp,
                "--python",
                sys.executable,
                PYTRITON,
            ],
            check=True,
        )
        server = Path(tmp) / "pytriton" / "tritonserver"
        shutil.rmtree(dest, ignore_errors=True)
        (dest / "bin").mkdir(parents=True)
        shutil.copy2(server / "bin" / "tritonserver", dest / "bin" / "tritonserver")
        shutil.copytree(Path(tmp) / "nvidia_pytriton.libs", dest / "lib")
        backend = dest / "backends" / "python"
        backend.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(server / "backends" / "python" / name, backend / name)
        shutil.copy2(
            server / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub",
            backend / "triton_python_backend_stub",
        )
    stamp.write_text(json.dumps({"wheel": PYTRITON}))
    return dest


def provision_models_env(env: Path, python: str = f"/usr/bin/python{STUB_PYTHON}") -> Path:
    stamp = env / "requirements.txt"
    wanted = REQUIREMENTS.read_text()
    if stamp.exists() and stamp.read_text() == wanted:
        return env
    if not any(WHEELS.glob("torch-*+cpu-*.whl")):
        raise SystemExit(
            f"no torch CPU wheel in {WHEELS}: run scripts/torch-wheel.sh (make setup does)"
        )
    subprocess.run([*_uv(), "venv", "--quiet", "--clear", "--python", python, str(env)], check=True)
    subprocess.run(
        [
            *_uv(),
            "pip",
            "install",
            "--quiet",
            "--python",
            str(env / "bin" / "python"),
            "--find-links",
            str(WHEELS),
            "-r",
            str(REQUIREMENTS),
        ],
        check=True,
    )
    stamp.write_text(wanted)
    return env


def site_packages(env: Path) -> Path:
    return env / "lib" / f"python{STUB_PYTHON}" / "site-packages"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", type=Path, default=Path(".envs/triton"))
    parser.add_argument("--models-env", type=Path, default=Path(".envs/triton-models"))
    args = parser.parse_args()
    provision_server(args.dest)
    provision_models_env(args.models_env)
    print(f"triton server in {args.dest}, models environment in {args.models_env}")


if __name__ == "__main__":
    main()

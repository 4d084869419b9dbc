#!/usr/bin/env bash
# Puts torch's CPU build (the file uv.lock pins) into wheels/, where the
# lock's find-links entry looks: already there with the pinned sha256, or
# copied from a local wheel folder (MLMESH_WHEEL_DIR, default /opt/wheels),
# or downloaded from the PyTorch CPU index (MLMESH_TORCH_INDEX_URL, default
# https://download.pytorch.org/whl/cpu), bounded by MLMESH_TORCH_TIMEOUT
# seconds; always checked against the pinned sha256 before it is renamed
# into place. See libs/runner/src/mlmesh_runner/torchwheel.py (standard
# library only: this runs before .venv exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
# -P: the module's folder is not put on sys.path (only the standard library is imported).
exec "$PYTHON" -P libs/runner/src/mlmesh_runner/torchwheel.py "$@"

#!/usr/bin/env bash
# Puts torch's CPU build (the version uv.lock pins) into wheels/, where the
# lock's find-links entry looks: from a local wheel folder when one has it.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
LOCAL=${MLMESH_WHEEL_DIR:-/opt/wheels}
mkdir -p wheels
[ -f "wheels/$WHEEL" ] && exit 0
if [ -f "$LOCAL/$WHEEL" ]; then
  cp "$LOCAL/$WHEEL" "wheels/$WHEEL.part" && mv "wheels/$WHEEL.part" "wheels/$WHEEL"
  exit 0
fi
echo "torch CPU wheel $WHEEL not found in $LOCAL" >&2
exit 1

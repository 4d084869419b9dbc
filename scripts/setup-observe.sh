#!/usr/bin/env bash
# Sets up what `mlmesh-run --observe` starts beside the mesh: Prometheus (and
# promtool) from Debian's `prometheus` package, and Arize Phoenix, the trace
# store, in its own environment (.envs/phoenix, pinned by
# libs/runner/phoenix-requirements.txt). Idempotent and quick when done;
# called by scripts/setup.sh after the services' .venv exists.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "installing prometheus (Debian's package)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # --no-install-recommends: no node exporter; the package's service is not
  # started here (the runner starts its own Prometheus on loopback).
  $sudo apt-get update -q >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends prometheus >/dev/null
fi
.venv/bin/python -m mlmesh_runner.phoenixenv --env .envs/phoenix >/dev/null

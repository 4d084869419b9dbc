#!/usr/bin/env bash
# The review page's browser test (tests/test_review_page_mesh.py) drives
# Debian's chromium with Playwright (the playwright package is in the
# workspace's dev dependencies). Never `playwright install`: it downloads a
# browser build of its own. Idempotent: installs only when chromium is absent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
echo "installing chromium (Debian's package)"
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium >/dev/null

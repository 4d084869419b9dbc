#!/usr/bin/env bash
# Creates bench/litellm/.venv with the pinned LiteLLM proxy (requirements.txt), apart
# from the workspace's .venv: LiteLLM pins versions of openai, pydantic, aiohttp... that
# the workspace does not share. Idempotent; re-run after changing requirements.txt.
#   bash bench/litellm/setup.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3.11}"
if [ ! -x "$here/.venv/bin/python" ]; then
    "$python" -m venv "$here/.venv"
fi
if command -v uv >/dev/null 2>&1; then
    uv pip install --python "$here/.venv/bin/python" -r "$here/requirements.txt"
else
    "$here/.venv/bin/python" -m pip install --quiet --upgrade pip
    "$here/.venv/bin/python" -m pip install --quiet -r "$here/requirements.txt"
fi
"$here/.venv/bin/litellm" --version

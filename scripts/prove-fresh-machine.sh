#!/usr/bin/env bash
# Proves the README's two commands work on a machine without a local torch
# wheel folder: torch's CPU build then comes from the PyTorch CPU index.
#
#   sudo scripts/prove-fresh-machine.sh [options] [-- COMMAND...]
#
#   COMMAND         run in the fresh clone (default: make setup); e.g. -- make test
#   --run-check     then `make run` until .mlmesh/ready.json appears, one call
#                   through Envoy (grpcurl list, mlmesh resolve), Ctrl-C (SIGINT)
#   --overlay PATH  copy this file of the working tree over the clone (repeatable):
#                   the clone is HEAD, so uncommitted files are proved only if named
#   --working-tree  overlay every uncommitted change (tracked and untracked) instead
#   --index-url URL use this PyTorch CPU index (or mirror); default: a loopback
#                   mirror of https://download.pytorch.org/whl/cpu (see below)
#   --keep          keep the work folder (clone, caches, logs) for inspection
#
# What "fresh" means here, each undone when the script ends, even on failure:
# - a new `git clone` of this checkout in a temporary folder (no .venv, .envs,
#   wheels/, .mlmesh or generated stubs);
# - a private mount namespace (unshare -m) in which empty tmpfs are mounted
#   over /opt/wheels (the local torch wheel folder) and /opt/pypi,
#   /opt/pypi-more (this machine's local package mirrors, which its pip
#   configuration names);
# - empty uv and pip caches (UV_CACHE_DIR, PIP_CACHE_DIR in the work folder);
#   pip reads no configuration file (PIP_CONFIG_FILE=/dev/null) and every
#   PIP_* and UV_* variable is unset first. This machine's pip is configured
#   with find-links=/opt/wheels (PIP_FIND_LINKS and ~/.config/pip/pip.conf),
#   extra-index-url file:///opt/pypi/simple and file:///opt/pypi-more/simple
#   (~/.config/pip/pip.conf; /opt/pypi-more holds a torch 2.14.1), and a
#   constraint file (/etc/xdg/pip/pip.conf); uv reads none of them, but
#   set-up may call pip (to install uv), so all are neutralised.
# download.pytorch.org cannot be reached from the machine this was written
# on (only PyPI, Debian and npm can), so by default the index is a loopback
# HTTP server with the PyTorch CPU index's layout (/whl/cpu/torch/, a PEP 503
# page, and the file), holding the file copied from /opt/wheels before that
# folder is hidden; MLMESH_TORCH_INDEX_URL points at it. Where the real index
# is reachable, --index-url https://download.pytorch.org/whl/cpu proves the
# same against it. Everything else (PyPI, Debian packages) comes from the
# network as on any machine.
#
# Needs root (unshare -m, mount), git, python3.11, and for the default mirror
# the torch wheel in /opt/wheels (or MLMESH_PROOF_WHEEL_DIR). Prints a summary
# with timings; exits non-zero when any step or check fails.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$SRC/scripts/prove-fresh-machine.sh"

if [ "${1:-}" = "--inside" ]; then
  # --- inside the private mount namespace -----------------------------------
  shift
  : "${PROOF_WORK:?}" "${PROOF_INDEX_URL:?}" "${PROOF_RUN_CHECK:?}"
  for hidden in /opt/wheels /opt/pypi /opt/pypi-more; do
    if [ -d "$hidden" ]; then
      mount -t tmpfs -o size=1m,mode=0755 mlmesh-proof-empty "$hidden"
      [ -z "$(ls -A "$hidden")" ] || { echo "could not hide $hidden" >&2; exit 1; }
      echo "hidden: $hidden (empty tmpfs in this mount namespace)"
    fi
  done
  # A clean package-tool environment: no PIP_*/UV_* settings, no pip config
  # files, empty caches, no local wheel folder.
  while IFS= read -r name; do unset "$name"; done < <(env | sed -n 's/^\(\(PIP\|UV\)_[A-Za-z0-9_]*\)=.*/\1/p')
  unset MLMESH_WHEEL_DIR
  export PIP_CONFIG_FILE=/dev/null
  export PIP_CACHE_DIR="$PROOF_WORK/pip-cache" UV_CACHE_DIR="$PROOF_WORK/uv-cache"
  export MLMESH_TORCH_INDEX_URL="$PROOF_INDEX_URL"
  mkdir -p "$PIP_CACHE_DIR" "$UV_CACHE_DIR"
  # Only what is set here (":env:" lines: the caches and the /dev/null config file).
  if python3.11 -m pip config list 2>/dev/null | grep -qv '^:env:'; then
    echo "pip still has configuration from a file:" >&2
    python3.11 -m pip config list >&2
    exit 1
  fi
  cd "$PROOF_WORK/mlmesh"
  started=$(date +%s)
  echo "+ $* (in $PWD)"
  set +e
  "$@" 2>&1 | tee "$PROOF_WORK/command.log"
  status=${PIPESTATUS[0]}
  set -e
  echo "command: $* -> exit $status in $(($(date +%s) - started)) s" >>"$PROOF_WORK/summary"
  [ "$status" -eq 0 ] || exit "$status"

  # What the command built took torch from the index, and only the CPU build.
  wheel=$(ls wheels/torch-*+cpu-*.whl)
  echo "wheels/: $(basename "$wheel") sha256 $(sha256sum "$wheel" | cut -d' ' -f1)" >>"$PROOF_WORK/summary"
  for python in .venv/bin/python .envs/llm/bin/python .envs/triton-models/bin/python; do
    [ -x "$python" ] || continue
    "$python" - "$python" >>"$PROOF_WORK/summary" <<'PY'
import importlib.metadata as m, sys
names = sorted({(d.metadata["Name"] or "").lower() for d in m.distributions()})
gpu = [n for n in names if n.startswith(("nvidia-", "cuda-"))]
torch = m.version("torch")
assert torch.endswith("+cpu") and not gpu, (torch, gpu)
print(f"{sys.argv[1]}: torch {torch}, no CUDA distribution")
PY
  done

  if [ "$PROOF_RUN_CHECK" = 1 ]; then
    for port in 8080 9901; do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is in use (another mesh?): make run needs it" >&2
        exit 1
      fi
    done
    started=$(date +%s)
    setsid make run >"$PROOF_WORK/run.log" 2>&1 &
    run_pid=$!
    stop_run() {
      kill -0 "$run_pid" 2>/dev/null || return 0
      kill -INT -- "-$run_pid" 2>/dev/null || true
      for _ in $(seq 1 120); do kill -0 "$run_pid" 2>/dev/null || return 0; sleep 1; done
      echo "make run did not stop within 120 s of SIGINT: killed" >&2
      kill -KILL -- "-$run_pid" 2>/dev/null || true
      return 1
    }
    trap 'stop_run || true' EXIT
    deadline=$((started + ${PROOF_RUN_TIMEOUT:-1500}))
    until [ -f .mlmesh/ready.json ]; do
      if ! kill -0 "$run_pid" 2>/dev/null; then
        echo "make run exited before the mesh was ready; its log:" >&2
        tail -n 40 "$PROOF_WORK/run.log" >&2
        exit 1
      fi
      if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "the mesh was not ready within ${PROOF_RUN_TIMEOUT:-1500} s; its log:" >&2
        tail -n 40 "$PROOF_WORK/run.log" >&2
        exit 1
      fi
      sleep 5
    done
    echo "make run: ready (.mlmesh/ready.json) in $(($(date +%s) - started)) s" >>"$PROOF_WORK/summary"
    key=$(cat .mlmesh/admin.key)
    # the key reaches grpcurl through its environment, never its argv (ps shows argv)
    MLMESH_PROOF_KEY=$key .venv/bin/grpcurl -plaintext -expand-headers \
      -H 'authorization: Bearer ${MLMESH_PROOF_KEY}' 127.0.0.1:8080 list \
      >"$PROOF_WORK/grpcurl-list.txt"
    grep -q '^mlmesh.gateway.v1.GatewayService$' "$PROOF_WORK/grpcurl-list.txt"
    echo "through Envoy: grpcurl list -> $(wc -l <"$PROOF_WORK/grpcurl-list.txt") services" >>"$PROOF_WORK/summary"
    resolved=$(MLMESH_API_KEY=$key .venv/bin/mlmesh resolve tiny-llama@champion)
    echo "through Envoy: mlmesh resolve tiny-llama@champion -> $resolved" >>"$PROOF_WORK/summary"
    stopping=$(date +%s)
    stop_run
    wait "$run_pid" && run_status=0 || run_status=$?
    trap - EXIT
    echo "make run: stopped by SIGINT in $(($(date +%s) - stopping)) s (exit $run_status)" >>"$PROOF_WORK/summary"
    if [ -n "$(pgrep -f "$PROOF_WORK/mlmesh/" || true)" ]; then
      echo "processes of the clone outlived make run:" >&2
      pgrep -af "$PROOF_WORK/mlmesh/" >&2
      exit 1
    fi
  fi
  exit 0
fi

# --- outside: the clone, the mirror, the namespace, the clean-up -------------
run_check=0 keep=0 working_tree=0 index_url="" overlays=()
while [ $# -gt 0 ]; do
  case "$1" in
    --run-check) run_check=1 ;;
    --keep) keep=1 ;;
    --working-tree) working_tree=1 ;;
    --overlay) overlays+=("${2:?--overlay needs a path}"); shift ;;
    --index-url) index_url=${2:?--index-url needs a URL}; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ $# -gt 0 ] || set -- make setup
[ "$(id -u)" -eq 0 ] || { echo "needs root (unshare -m, mount)" >&2; exit 2; }

work=$(mktemp -d /tmp/mlmesh-fresh.XXXXXX)
server_pid=""
cleanup() {
  status=$?
  [ -z "$server_pid" ] || { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
  if [ -f "$work/summary" ]; then
    echo "=== summary"
    cat "$work/summary"
  fi
  if [ "$keep" = 1 ]; then
    echo "kept: $work"
  else
    rm -rf "$work"
  fi
  [ "$status" -eq 0 ] && echo "PROOF PASSED" || echo "PROOF FAILED (exit $status)"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
t0=$(date +%s)

# The pinned file's name and digest, from the module set-up runs.
read -r wheel sha256 < <(python3.11 -P - "$SRC/libs/runner/src/mlmesh_runner/torchwheel.py" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("torchwheel", sys.argv[1])
module = sys.modules["torchwheel"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(module.PIN.filename, module.PIN.sha256)
PY
)

if [ -z "$index_url" ]; then
  local_dir=${MLMESH_PROOF_WHEEL_DIR:-/opt/wheels}
  [ -f "$local_dir/$wheel" ] || { echo "no $wheel in $local_dir to mirror" >&2; exit 1; }
  mkdir -p "$work/mirror/whl/cpu/torch"
  cp --reflink=auto "$local_dir/$wheel" "$work/mirror/whl/cpu/$wheel"
  served=$(sha256sum "$work/mirror/whl/cpu/$wheel" | cut -d' ' -f1)
  quoted=$(python3.11 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$wheel")
  # The layout and link form of https://download.pytorch.org/whl/cpu/torch/.
  printf '<!DOCTYPE html>\n<html><body><h1>Links for torch</h1>\n<a href="/whl/cpu/%s#sha256=%s" data-requires-python="&gt;=3.10">%s</a><br/>\n</body></html>\n' \
    "$quoted" "$served" "$wheel" >"$work/mirror/whl/cpu/torch/index.html"
  port=$(python3.11 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3.11 -m http.server --bind 127.0.0.1 --directory "$work/mirror" "$port" >"$work/mirror.log" 2>&1 &
  server_pid=$!
  index_url="http://127.0.0.1:$port/whl/cpu"
  for _ in $(seq 1 50); do
    python3.11 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
      "$index_url/torch/" 2>/dev/null && break
    sleep 0.2
  done
  echo "mirror: $index_url/torch/ serves $wheel (sha256 $served)" >>"$work/summary"
fi
echo "index: $index_url (MLMESH_TORCH_INDEX_URL); pinned sha256 $sha256" >>"$work/summary"

git clone -q "$SRC" "$work/mlmesh"
echo "clone: $(git -C "$work/mlmesh" rev-parse --short HEAD) of $SRC" >>"$work/summary"
if [ "$working_tree" = 1 ]; then
  mapfile -d '' overlays < <(git -C "$SRC" diff --name-only -z HEAD; git -C "$SRC" ls-files -z --others --exclude-standard)
fi
for path in "${overlays[@]}"; do
  path=${path#"$SRC"/}
  case "$path" in ''|.|..|/*|../*|*/..|*/../*) echo "overlay outside the checkout: ${path:0:80}" >&2; exit 2 ;; esac
  if [ -e "$SRC/$path" ]; then
    mkdir -p "$work/mlmesh/$(dirname "$path")"
    cp -a "$SRC/$path" "$work/mlmesh/$path"
  else
    rm -rf "${work:?}/mlmesh/$path"
  fi
  echo "overlay: $path" >>"$work/summary"
done

t1=$(date +%s)
PROOF_WORK=$work PROOF_INDEX_URL=$index_url PROOF_RUN_CHECK=$run_check \
  unshare -m --propagation private -- bash "$SELF" --inside "$@"
echo "inside the namespace: $(($(date +%s) - t1)) s; in all $(($(date +%s) - t0)) s" >>"$work/summary"
if [ -n "$server_pid" ]; then
  # The wheel came from the index: its one GET, and no other source.
  gets=$(grep -cF "GET /whl/cpu/$quoted " "$work/mirror.log" || true)
  echo "mirror log: $gets GET of the wheel, $(grep -c 'GET /whl/cpu/torch/ ' "$work/mirror.log" || true) of the page" >>"$work/summary"
  [ "$gets" -ge 1 ]
fi

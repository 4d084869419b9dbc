#!/usr/bin/env bash
# Make a Docker engine available on this machine (idempotent).
#
# - Installs Debian's docker.io and docker-compose when dockerd is missing (needs root).
# - Starts dockerd without a bridge and without iptables when no daemon answers: the
#   sandboxed machines this project runs on cannot create bridges, so containers use
#   `--network host` and builds use `docker build --network host`.
# - Waits (bounded) until `docker info` works.
#
# Env: MLMESH_DOCKERD_LOG (default /var/log/mlmesh-dockerd.log),
#      MLMESH_DOCKER_DATA_ROOT (default /var/lib/docker),
#      MLMESH_DOCKERD_WAIT (seconds, default 60).
set -euo pipefail

log_file="${MLMESH_DOCKERD_LOG:-/var/log/mlmesh-dockerd.log}"
data_root="${MLMESH_DOCKER_DATA_ROOT:-/var/lib/docker}"
wait_s="${MLMESH_DOCKERD_WAIT:-60}"
case "$wait_s" in '' | *[!0-9]*)
	echo "docker-engine: MLMESH_DOCKERD_WAIT must be a whole number of seconds" >&2
	exit 2
	;;
esac

as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

if ! command -v dockerd >/dev/null 2>&1; then
	echo "docker-engine: installing Debian's docker.io and docker-compose" >&2
	export DEBIAN_FRONTEND=noninteractive
	as_root apt-get update -q
	as_root apt-get install -y -q --no-install-recommends docker.io docker-compose
fi

if ! command -v docker >/dev/null 2>&1; then
	echo "docker-engine: no docker client on PATH after install" >&2
	exit 1
fi

if docker info >/dev/null 2>&1; then
	echo "docker-engine: daemon already answers ($(docker version --format '{{.Server.Version}}'))" >&2
	exit 0
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
	echo "docker-engine: starting dockerd (log: $log_file)" >&2
	as_root mkdir -p "$data_root" "$(dirname "$log_file")"
	# --bridge=none / --iptables=false: no bridge networking here; containers use the host
	# network. setsid + nohup so the daemon outlives this script and its terminal.
	as_root setsid nohup dockerd --bridge=none --iptables=false --ip6tables=false \
		--data-root "$data_root" >>"$log_file" 2>&1 </dev/null &
fi

deadline=$((SECONDS + wait_s))
until docker info >/dev/null 2>&1; do
	if [ "$SECONDS" -ge "$deadline" ]; then
		echo "docker-engine: dockerd did not answer within ${wait_s}s; last log lines:" >&2
		tail -n 20 "$log_file" >&2 || true
		exit 1
	fi
	sleep 1
done
echo "docker-engine: daemon ready ($(docker version --format '{{.Server.Version}}'))" >&2

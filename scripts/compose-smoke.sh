#!/usr/bin/env bash
# The Compose smoke test (CI): the whole mesh in containers, checked through Envoy.
#
#   scripts/compose-smoke.sh
#
# 1. a Docker engine (scripts/docker-engine.sh: installs Debian's docker.io and starts
#    dockerd when needed); 2. the images (scripts/build-images.sh, layer cache);
# 3. `docker-compose up -d` (project mlmesh-smoke: it never touches other containers);
# 4. waits until Envoy routes every cluster; 5. through Envoy on 127.0.0.1:18080: a key
#    made with the admin key, Generate, Infer, Embed, online features, SearchText on the
#    demo collection, a small batch job to SUCCEEDED; 6. `down` (volumes kept), `up -d`,
#    the same key works and the registry, the collection and the job survived;
# 7. `down -v`, and nothing of the project is left. On any failure: `ps` and the logs of
#    what is not healthy, then the teardown (always, by trap).
#
# Env: MLMESH_SMOKE_READY_S  the bound for the mesh to come up (default 900 s);
#      MLMESH_SMOKE_SKIP_BUILD=1  use the images as they are;
#      MLMESH_SMOKE_KEEP=1  leave the mesh and its volumes up at the end (debugging).
set -euo pipefail
cd "$(dirname "$0")/.."

project=mlmesh-smoke
files=(-f deploy/compose/docker-compose.yml)
compose() { docker-compose -p "$project" --project-directory deploy/compose "${files[@]}" "$@"; }
python=.venv/bin/python
ready_s="${MLMESH_SMOKE_READY_S:-900}"
case "$ready_s" in '' | *[!0-9]*)
	echo "compose-smoke: MLMESH_SMOKE_READY_S must be a whole number" >&2
	exit 2
	;;
esac
work="$(mktemp -d "${TMPDIR:-/tmp}/mlmesh-smoke.XXXXXX")"
chmod 700 "$work"
declare -a phases=()
phase_start=$SECONDS
phase() { # phase NAME: closes the running phase's timer
	phases+=("$(printf '%-28s %5ss' "$1" $((SECONDS - phase_start)))")
	echo "compose-smoke: $1 done in $((SECONDS - phase_start))s" >&2
	phase_start=$SECONDS
}

diagnose() {
	echo "compose-smoke: ---- docker-compose ps" >&2
	compose ps >&2 || true
	local ids id name health state
	ids="$(compose ps -q 2>/dev/null || true)"
	for id in $ids; do
		name="$(docker inspect --format '{{index .Config.Labels "com.docker.compose.service"}}' "$id")"
		state="$(docker inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$id")"
		health="$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")"
		if [ "$health" = healthy ] || [ "$state" = "exited 0" ]; then continue; fi
		echo "compose-smoke: ---- $name ($state${health:+, $health}): last log lines" >&2
		docker logs --tail 40 "$id" 2>&1 | sed "s/^/  $name| /" >&2 || true
	done
}

teardown() {
	local code=$?
	trap - EXIT INT TERM
	if [ "$code" -ne 0 ]; then
		echo "compose-smoke: FAILED ($code)" >&2
		diagnose
	fi
	if [ "${MLMESH_SMOKE_KEEP:-0}" = 1 ]; then
		echo "compose-smoke: MLMESH_SMOKE_KEEP=1: left up (docker-compose -p $project ... down -v)" >&2
	else
		compose down -v --remove-orphans --timeout 20 >/dev/null 2>&1 || true
	fi
	rm -rf "$work"
	exit "$code"
}
trap teardown EXIT
trap 'exit 130' INT TERM

admin_key() { # the admin key, from its volume (never printed, never an argument)
	compose run --rm -T --no-deps --entrypoint cat keys /state/admin/admin.key
}

up_and_wait() {
	# `up -d` starts each service once what it depends on is healthy (or, for the
	# one-shot steps, completed); the driver then waits until Envoy routes everything.
	compose up -d
	"$python" deploy/compose/smoke.py wait --timeout "$ready_s"
}

total_start=$SECONDS
bash scripts/docker-engine.sh
phase "docker engine"
if [ "${MLMESH_SMOKE_SKIP_BUILD:-0}" != 1 ]; then
	bash scripts/build-images.sh --report "$work/build.json" >&2
fi
phase "build images (cached)"
# Generated files are current (or the mesh would not be the registrations').
"$python" -m mlmesh_runner.compose --check
# A previous run's leftovers (also volumes an older compose file declared).
compose down -v --remove-orphans >/dev/null 2>&1 || true
project_volumes() { docker volume ls -q --filter "label=com.docker.compose.project=$project"; }
leftover="$(project_volumes)"
[ -z "$leftover" ] || docker volume rm $leftover >/dev/null
up_and_wait
phase "up + ready"
# The batch job's small input, written into the batch service's volume.
compose exec -T batch python -c 'import sys; from pathlib import Path; from mlmesh_batch.demo import write_sentences; write_sentences(Path(sys.argv[1]), 40)' /state/batch/data/smoke/sentences.parquet
MLMESH_API_KEY="$(admin_key)" "$python" deploy/compose/smoke.py first --work "$work"
phase "checks through envoy"
compose down --timeout 20
phase "down (volumes kept)"
up_and_wait
phase "up again + ready"
"$python" deploy/compose/smoke.py again --work "$work"
phase "state survived"
compose down -v --remove-orphans --timeout 20
left="$(docker ps -aq --filter "label=com.docker.compose.project=$project")"
volumes="$(project_volumes)"
if [ -n "$left" ] || [ -n "$volumes" ]; then
	echo "compose-smoke: left behind: containers [$left] volumes [$volumes]" >&2
	exit 1
fi
phase "down -v, nothing left"
echo "compose-smoke: passed in $((SECONDS - total_start))s"
printf '  %s\n' "${phases[@]}"

#!/usr/bin/env bash
# Builds every mlmesh image from deploy/docker/Dockerfile, tagged
# mlmesh/<target>:${MLMESH_IMAGE_TAG:-dev}, and prints each image's build seconds and size.
#
#   scripts/build-images.sh [--report FILE] [--prune] [TARGET ...]
#
# --report FILE  also write the seconds and sizes as JSON.
# --prune        afterwards remove dangling images older than an hour (earlier builds'
#                images that a rebuild untagged; the layer cache of the current ones stays).
#
# Run after scripts/setup.sh (the build context needs the generated contract stubs and
# wheels/). Builds use `--network host` (dockerd here has no bridge) and the layer cache: a
# second run with nothing changed takes seconds.
#
# Env: BASE_IMAGE   the base to build on. Default: python:3.11-slim when it is present or can
#                   be pulled, else mlmesh/base:bookworm (built by scripts/build-base-image.sh
#                   when absent).
#      MLMESH_IMAGE_TAG (default dev).
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(services registry gateway features vectors batch deployer monitor review ray flink llm triton envoy redis postgres)

report=""
prune=0
targets=()
while [ "$#" -gt 0 ]; do
	case "$1" in
	--report)
		[ "$#" -ge 2 ] || { echo "build-images: --report needs a file" >&2; exit 2; }
		report="$2"
		shift 2
		;;
	--prune)
		prune=1
		shift
		;;
	-h | --help)
		sed -n '2,18p' "$0"
		exit 0
		;;
	*)
		if [[ " ${ALL_TARGETS[*]} " != *" $1 "* ]]; then
			echo "build-images: unknown target '$1' (one of: ${ALL_TARGETS[*]})" >&2
			exit 2
		fi
		targets+=("$1")
		shift
		;;
	esac
done
[ "${#targets[@]}" -gt 0 ] || targets=("${ALL_TARGETS[@]}")

tag="${MLMESH_IMAGE_TAG:-dev}"
if ! [[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
	echo "build-images: MLMESH_IMAGE_TAG is not a valid image tag" >&2
	exit 2
fi

if [ ! -f libs/contracts/src/mlmesh/.generated ] || ! ls wheels/torch-*.whl >/dev/null 2>&1; then
	echo "build-images: run scripts/setup.sh first (generated contracts and wheels/ are missing)" >&2
	exit 1
fi

docker info >/dev/null 2>&1 || bash scripts/docker-engine.sh

base="${BASE_IMAGE:-}"
if [ -z "$base" ]; then
	if docker image inspect python:3.11-slim >/dev/null 2>&1 ||
		timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
		base=python:3.11-slim
	else
		base=mlmesh/base:bookworm
		echo "build-images: python:3.11-slim cannot be pulled; using $base" >&2
	fi
fi
if [ "$base" = mlmesh/base:bookworm ]; then
	bash scripts/build-base-image.sh
fi

# BuildKit when the client has it (buildx), else the classic builder, which the Dockerfile
# also supports; either way the layer cache is the daemon's.
if ! docker buildx version >/dev/null 2>&1; then
	export DOCKER_BUILDKIT=0
fi

# One snapshot of the build context for every target: the images are built from the same
# sources even if the tree changes meanwhile, and the context is read once. The files are
# those .dockerignore lets in (the daemon applies it to the archive too).
work="$(mktemp -d "${TMPDIR:-/tmp}/mlmesh-images.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tar -c -f "$work/context.tar" \
	--exclude='tests' --exclude='__pycache__' --exclude='*.pyc' --exclude='.pytest_cache' \
	--exclude='.mypy_cache' --exclude='.ruff_cache' --exclude='*.egg-info' --exclude='node_modules' \
	.dockerignore pyproject.toml uv.lock libs services wheels deploy/docker deploy/envoy/envoy.yaml

logs="${TMPDIR:-/tmp}/mlmesh-build-logs"
mkdir -p "$logs"
declare -A seconds=()
total_start=$SECONDS
for target in "${targets[@]}"; do
	start=$SECONDS
	echo "build-images: building mlmesh/$target:$tag (base $base)" >&2
	docker build --network host \
		--file deploy/docker/Dockerfile \
		--build-arg "BASE_IMAGE=$base" \
		--target "$target" \
		--tag "mlmesh/$target:$tag" \
		- <"$work/context.tar" >"$logs/$target.log" 2>&1 || {
		tail -n 40 "$logs/$target.log" >&2
		echo "build-images: mlmesh/$target:$tag failed (log: $logs/$target.log)" >&2
		exit 1
	}
	seconds[$target]=$((SECONDS - start))
done
total=$((SECONDS - total_start))

printf '%-10s %8s %10s\n' IMAGE SECONDS SIZE_MB
rows=()
for target in "${targets[@]}"; do
	size=$(docker image inspect --format '{{.Size}}' "mlmesh/$target:$tag")
	printf '%-10s %8s %10s\n' "$target" "${seconds[$target]}" "$((size / 1000000))"
	rows+=("{\"image\": \"mlmesh/$target:$tag\", \"seconds\": ${seconds[$target]}, \"size_bytes\": $size}")
done
printf 'total %ss (base %s)\n' "$total" "$base"

if [ -n "$report" ]; then
	{
		printf '{"base": "%s", "total_seconds": %s, "images": [' "$base" "$total"
		(
			IFS=,
			printf '%s' "${rows[*]}"
		)
		printf ']}\n'
	} >"$report"
fi

if [ "$prune" -eq 1 ]; then
	docker image prune -f --filter until=1h >&2
fi

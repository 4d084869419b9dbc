#!/usr/bin/env bash
# Build the local base image mlmesh/base:bookworm from Debian's packages (debootstrap),
# for machines that cannot pull python:3.11-slim from a public registry.
#
# Usage: scripts/build-base-image.sh [--force]
# Env:   MLMESH_BASE_IMAGE (default mlmesh/base:bookworm)
#        MLMESH_DEBIAN_MIRROR (default: the first deb.debian.org-style URI apt uses here,
#                              else http://deb.debian.org/debian)
#
# The package list is what the images need at run time:
#   python3.11        the interpreter every Python image runs (uv builds venvs on it)
#   libpython3.11     libpython3.11.so.1.0: Triton's python backend stub links against it
#   libexpat1, zlib1g also linked by the stub / tritonserver
#   libstdc++6 libgomp1 libnuma1  torch (OpenMP) and vLLM's CPU build
#   ca-certificates   TLS for anything that talks https
#   procps            ps/pgrep: Flink's and Ray's scripts call them
# python3.11-venv is deliberately absent: its postinst fails under --variant=minbase, and uv
# creates virtual environments without the venv module.
set -euo pipefail

image="${MLMESH_BASE_IMAGE:-mlmesh/base:bookworm}"
force=0
[ "${1:-}" = "--force" ] && force=1

if [ "$force" -eq 0 ] && docker image inspect "$image" >/dev/null 2>&1; then
	echo "build-base-image: $image already present" >&2
	exit 0
fi

mirror="${MLMESH_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
	# Use the mirror apt on this machine uses (deb822 "URIs:" or one-line "deb URL suite").
	mirror="$(
		cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
			awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}
			     /^deb / && $2 !~ /security/ && $2 !~ /^\[/ {print $2; exit}' || true
	)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
case "$mirror" in http://* | https://*) ;; *)
	echo "build-base-image: refusing mirror '$mirror' (must be an http(s) URL)" >&2
	exit 2
	;;
esac

command -v debootstrap >/dev/null 2>&1 || {
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q && apt-get install -y -q --no-install-recommends debootstrap
}

packages=python3.11,libpython3.11,libexpat1,zlib1g,libstdc++6,libgomp1,libnuma1,ca-certificates,procps

root="$(mktemp -d /var/tmp/mlmesh-base.XXXXXX)"
trap 'rm -rf --one-file-system "$root"' EXIT
echo "build-base-image: debootstrap bookworm from $mirror into $root" >&2
debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >&2

# python3 / python point at 3.11 (minbase has no python3 symlink without the python3 package).
ln -sf python3.11 "$root/usr/bin/python3"
ln -sf python3.11 "$root/usr/bin/python"
# Trim what no container needs: apt lists, docs, man pages, locales beyond C.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
	"$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
# Trust what this machine trusts: CA certificates in the host's bundle that Debian's is
# missing (e.g. a TLS-intercepting proxy's) become local CAs of the image, so builds on
# this base (uv, urllib) reach PyPI the way the host does. The base image is machine-local.
host_bundle="${MLMESH_HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
if [ -f "$host_bundle" ]; then
	python3 - "$host_bundle" "$root/etc/ssl/certs/ca-certificates.crt" "$root/usr/local/share/ca-certificates" <<'PY'
import re, sys
from pathlib import Path
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
host = pem.findall(Path(sys.argv[1]).read_text())
have = set(pem.findall(Path(sys.argv[2]).read_text()))
extra = [c for c in host if c not in have]
out = Path(sys.argv[3]); out.mkdir(parents=True, exist_ok=True)
for i, cert in enumerate(extra):
    (out / f"mlmesh-host-{i}.crt").write_text(cert + "\n")
print(f"build-base-image: {len(extra)} extra CA certificate(s) from the host", file=sys.stderr)
PY
	chroot "$root" update-ca-certificates >&2
fi
# The image's apt must use the same mirror.
echo "deb $mirror bookworm main" >"$root/etc/apt/sources.list"

tar -C "$root" --numeric-owner -c . |
	docker import \
		--change 'ENV LANG=C.UTF-8' \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'CMD ["python3.11"]' \
		- "$image" >&2
docker run --rm --network host "$image" python3.11 -c 'import ssl, sqlite3, sys; print(sys.version)'
echo "build-base-image: built $image" >&2

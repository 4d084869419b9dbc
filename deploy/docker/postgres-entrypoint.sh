#!/bin/sh
# PostgreSQL for mlmesh, as user mlmesh on a read-only rootfs: the cluster lives in $PGDATA
# (on the /state volume) and is created there on first start; sockets go to /tmp.
#
# Env: PGDATA (default /state/pgdata), PGPORT (5433), MLMESH_POSTGRES_LISTEN (127.0.0.1),
#      MLMESH_POSTGRES_USER (mlmesh), MLMESH_POSTGRES_DB (mlmesh),
#      MLMESH_POSTGRES_PASSWORD_FILE: a file holding the password; without it, local
#      (127.0.0.1 / socket) connections are trusted and nothing else may connect.
set -eu
bin=/usr/local/lib/pgbin
: "${PGDATA:=/state/pgdata}" "${PGPORT:=5433}"
listen="${MLMESH_POSTGRES_LISTEN:-127.0.0.1}"
user="${MLMESH_POSTGRES_USER:-mlmesh}"
db="${MLMESH_POSTGRES_DB:-mlmesh}"
case "$user$db" in *[!A-Za-z0-9_]*)
	echo "postgres-entrypoint: user and database names must be [A-Za-z0-9_]" >&2
	exit 2
	;;
esac
case "$PGPORT" in '' | *[!0-9]*)
	echo "postgres-entrypoint: PGPORT must be a number" >&2
	exit 2
	;;
esac
export PGDATA PGPORT

if [ ! -s "$PGDATA/PG_VERSION" ]; then
	mkdir -p "$PGDATA"
	chmod 700 "$PGDATA"
	pwfile=""
	auth=trust
	if [ -n "${MLMESH_POSTGRES_PASSWORD_FILE:-}" ]; then
		pwfile="--pwfile=$MLMESH_POSTGRES_PASSWORD_FILE"
		auth=scram-sha-256
	fi
	# shellcheck disable=SC2086
	"$bin/initdb" --username="$user" --encoding=UTF8 --locale=C.UTF-8 \
		--auth-local="$auth" --auth-host="$auth" $pwfile >&2
	if [ "$auth" = trust ]; then
		# Trust only loopback; everything else is refused.
		cat >"$PGDATA/pg_hba.conf" <<HBA
local all all trust
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
HBA
	fi
	"$bin/postgres" --single -D "$PGDATA" -c unix_socket_directories=/tmp postgres >/dev/null <<SQL
CREATE DATABASE $db OWNER $user;
SQL
	echo "postgres-entrypoint: initialised $PGDATA (database $db, user $user, auth $auth)" >&2
fi

exec "$bin/postgres" -D "$PGDATA" -p "$PGPORT" -c listen_addresses="$listen" \
	-c unix_socket_directories=/tmp -c logging_collector=off "$@"

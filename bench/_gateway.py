"""Shared plumbing for the gateway benchmarks (not a benchmark itself).

A bench API key (created through KeyService with the bootstrap admin key),
the usage ledger's row counts (read-only from the gateway's SQLite file),
the Redis database the --redis runs use (flushed before and after), and the
gateway log's warnings that say a run's numbers are not what they seem.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from mlmesh.gateway.v1 import gateway_pb2, key_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as key_rpc

REDIS_URL = "redis://127.0.0.1:6379/15"
BIG = 10**12
MAX_STREAMS = 100_000
CALL_TIMEOUT = 30.0
KEY_KINDS = ("limited", "admin")
# Gateway log lines that mean a throttle or ledger step did not happen.
LOG_WARNINGS = {
    "redis_unreachable": "Redis unreachable",
    "not_settled": "could not settle",
    "usage_not_recorded": "not recorded",
}


def add_gateway_args(parser: Any) -> None:
    parser.add_argument(
        "--key",
        choices=KEY_KINDS,
        default="limited",
        help="limited: a GENERATE+INFER key with limits far above the run's use, so "
        "every throttle check runs; admin: the bootstrap admin key (no limits) "
        "(default limited)",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help=f"throttle in Redis ({REDIS_URL}, flushed before and after) instead of in-process",
    )


def configure_throttle(redis: bool) -> None:
    """Sets (or clears) MLMESH_GATEWAY_REDIS_URL before the mesh starts."""
    if redis:
        os.environ["MLMESH_GATEWAY_REDIS_URL"] = REDIS_URL
        flush_redis()
    else:
        os.environ.pop("MLMESH_GATEWAY_REDIS_URL", None)


async def make_key(channel: Any, admin_key: str, kind: str) -> tuple[str, dict[str, Any]]:
    """(secret, description) of the key the benchmark calls with."""
    if kind == "admin":
        return admin_key, {"kind": "admin", "scopes": ["ADMIN"], "limits": None}
    limits = {
        "requests_per_minute": BIG,
        "tokens_per_minute": BIG,
        "max_concurrent_streams": MAX_STREAMS,
    }
    key = gateway_pb2.Key(
        display_name="bench gateway",
        scopes=gateway_pb2.KeyScopes(
            model_patterns=["*"],
            services=[gateway_pb2.PLATFORM_SERVICE_GENERATE, gateway_pb2.PLATFORM_SERVICE_INFER],
        ),
        limits=gateway_pb2.KeyLimits(
            requests_per_minute=BIG, tokens_per_minute=BIG, max_concurrent_streams=MAX_STREAMS
        ),
    )
    reply = await key_service_pb2_grpc.KeyServiceStub(channel).CreateKey(
        key_rpc.CreateKeyRequest(key=key),
        metadata=(("authorization", f"Bearer {admin_key}"),),
        timeout=CALL_TIMEOUT,
    )
    return reply.secret, {
        "kind": "limited",
        "id": reply.key.id,
        "scopes": ["GENERATE", "INFER"],
        "model_patterns": ["*"],
        "limits": limits,
    }


def ledger_rows(state: Path) -> dict[str, int]:
    """usage_events rows per service/status in the gateway's SQLite file."""
    path = state / "gateway.db"
    names = {
        gateway_pb2.PLATFORM_SERVICE_GENERATE: "generate",
        gateway_pb2.PLATFORM_SERVICE_INFER: "infer",
    }
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
            rows = db.execute(
                "SELECT service, status, count(*) FROM usage_events GROUP BY service, status"
            ).fetchall()
    except sqlite3.Error as error:
        return {"error": str(error)}  # type: ignore[dict-item]
    return {f"{names.get(s, s)}/{status}": n for s, status, n in rows}


def log_warnings(state: Path) -> dict[str, int]:
    try:
        text = (state / "logs" / "gateway.log").read_text(errors="replace")
    except OSError as error:
        return {"error": str(error)}  # type: ignore[dict-item]
    return {name: text.count(needle) for name, needle in LOG_WARNINGS.items()}


def flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


def redis_throttle_keys() -> int:
    """How many throttle keys the gateway left in Redis (0: Redis was not used)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        return sum(1 for _ in client.scan_iter("mlmesh:throttle:*"))
    finally:
        client.close()


def redis_pid() -> int | None:
    """The pid of the redis-server listening on REDIS_URL's port (to meter its CPU)."""
    port = REDIS_URL.rsplit(":", 1)[1].split("/", 1)[0].encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # redis-server rewrites its title: "redis-server 127.0.0.1:6379".
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").split()
        except OSError:
            continue
        if (
            title
            and title[0].endswith(b"redis-server")
            and any(t.endswith(b":" + port) for t in title[1:])
        ):
            return int(entry.name)
    return None


def checks_after(state: Path, redis: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"ledger": ledger_rows(state), "gateway_log": log_warnings(state)}
    if redis:
        out["redis_throttle_keys"] = redis_throttle_keys()
    return out


def disturbers() -> list[int]:
    """Pids of test runs (``pytest`` in the command line) on the machine now:
    they take the CPUs the measured processes share, so a run that saw one
    says so in its checks."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"pytest") or b"pytest/" in arg for arg in argv[:6]):
            out.append(int(entry.name))
    return out


# Cores the rest of the machine may keep busy before a run counts as disturbed.
OTHER_CORES_LIMIT = 0.25


def other_cores(cpu: dict[str, float], seconds: float) -> float:
    """Cores busy outside the metered processes over a burst's time (from
    _triton.MachineCpuMeter's "other")."""
    other = cpu.get("other")
    if other is None or not seconds:
        return float("nan")
    return round(max(other, 0.0) / seconds, 2)


class DisturbanceLog:
    """Samples disturbers() at each call of check(); remembers what it saw.
    The report also gives the most "other" cores any measured burst saw."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.samples = 0
        self.disturbed = 0
        self.max_other_cores = float("nan")

    @property
    def clean(self) -> bool:
        return not self.disturbed and not self.max_other_cores > OTHER_CORES_LIMIT

    def check(self) -> None:
        found = disturbers()
        self.samples += 1
        self.disturbed += bool(found)
        self.seen.update(found)

    def report(self, summaries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        values = [s.get("other_cores", float("nan")) for s in summaries or []]
        values = [v for v in values if v == v]
        most = max(values) if values else float("nan")
        self.max_other_cores = most
        return {
            "samples": self.samples,
            "samples_with_pytest_running": self.disturbed,
            "pytest_pids": sorted(self.seen),
            "max_other_cores": most,
            "other_cores_limit": OTHER_CORES_LIMIT,
            "clean": not self.disturbed and not most > OTHER_CORES_LIMIT,
        }

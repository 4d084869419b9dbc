"""Test helpers: real servers on port 0, and status assertions."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from mlmesh_chassis.errors import ErrorDetails, details_of


async def expect_error(awaitable, code: grpc.StatusCode) -> ErrorDetails:  # type: ignore[no-untyped-def]
    """Awaits a call that must fail with ``code``; returns its unpacked details."""
    try:
        await awaitable
    except grpc.RpcError as exc:
        details = details_of(exc)
        assert details.code == code, (
            f"expected {code.name}, got {details.code.name}: {details.message}"
        )
        return details
    raise AssertionError(f"expected {code.name}, but the call succeeded")


class RedisServer:
    """A real, private redis-server (no persistence) that a test can stop and
    start again: on a unix socket, or on a TCP port of its own (for other
    processes, e.g. gateway replicas started by the runner)."""

    def __init__(self, folder: Path, tcp: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is required (the machine's Redis package has it)")
        self.binary = binary
        self.folder = folder
        self.socket = folder / "redis.sock"
        self.tcp = tcp
        self.port = 0  # TCP: chosen at the first start, kept for restarts
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0" if self.tcp else f"unix://{self.socket}"

    def start(self) -> None:
        """Starts redis-server. On TCP the server binds the port itself: a
        random one, another if that is taken (redis cannot take port 0), and
        the same one on a restart. No bind-then-close probe, which races."""
        if not self.tcp or self.port:
            if not self._launch(self.port):
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            return
        for _ in range(20):
            port = random.randint(20000, 59999)
            if self._launch(port):
                self.port = port
                return
        raise RuntimeError("redis-server found no free port in 20 tries")

    def _launch(self, port: int) -> bool:
        """Whether redis-server came up listening on ``port`` (0: none)."""
        self._process = process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--unixsocket",
                str(self.socket),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            if self.socket.exists():
                return True
            if process.poll() is not None:  # it could not bind: the port is taken
                self._process = None
                return False
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        self.socket.unlink(missing_ok=True)


# ---- keys for servers under test ----------------------------------------------------


def directory_key(services: list[int], key_id: str = "", revision: int = 1) -> tuple[Any, str]:
    """A DirectoryKey holding ``services`` and its fresh secret."""
    from mlmesh.gateway.v1 import gateway_pb2 as pb
    from mlmesh.gateway.v1 import key_directory_service_pb2 as kd

    from mlmesh_chassis.auth import secret_sha256

    key_id = key_id or secrets.token_hex(8)
    secret = f"mlm_{key_id}_{secrets.token_urlsafe(24)}"
    key = pb.Key(
        id=key_id,
        display_name="test",
        state=pb.KEY_STATE_ACTIVE,
        scopes=pb.KeyScopes(services=services, model_patterns=["*"]),  # type: ignore[arg-type]
    )
    return kd.DirectoryKey(key=key, secret_sha256=secret_sha256(secret), revision=revision), secret


def bearer_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


PG_ADMIN_URL = os.environ.get(
    "MLMESH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "mlmesh_test") -> Iterator[str]:
    """A fresh, empty database on the machine's PostgreSQL (its URL), dropped
    afterwards. Raises RuntimeError when PostgreSQL cannot be reached."""
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    # NullPool: tests may restart PostgreSQL, which kills pooled connections.
    engine = sa.create_engine(
        PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as error:
        raise RuntimeError(f"PostgreSQL is required ({PG_ADMIN_URL}): {error}") from error
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def bootstrap_keys_file(folder: Path, services: list[int]) -> tuple[Path, str]:
    """A bootstrap key directory with one key holding ``services`` (for a
    service under test started without a gateway); (its path, the secret)."""
    from google.protobuf import json_format
    from mlmesh.gateway.v1 import key_directory_service_pb2 as kd

    entry, secret = directory_key(services)
    path = folder / "bootstrap-keys.json"
    path.write_text(json_format.MessageToJson(kd.WatchKeysResponse(snapshot=True, keys=[entry])))
    return path, secret


def keyed_channel(target: str, secret: str) -> grpc.aio.Channel:
    """A channel whose every call carries ``secret``."""
    from mlmesh_chassis.interceptors import api_key_interceptors

    return grpc.aio.insecure_channel(target, interceptors=api_key_interceptors(secret))


@contextlib.contextmanager
def acting_as(secret: str, folder: Path) -> Iterator[None]:
    """This process's service identity is the key ``secret`` meanwhile (a
    chassis global: what a service's own outgoing calls carry), then the
    previous one again."""
    from mlmesh_chassis.auth import ServiceIdentity, service_identity, set_service_identity

    path = folder / f"service-{secrets.token_hex(4)}.key"
    path.write_text(secret)
    previous = service_identity()
    set_service_identity(ServiceIdentity(path))
    try:
        yield
    finally:
        set_service_identity(previous)

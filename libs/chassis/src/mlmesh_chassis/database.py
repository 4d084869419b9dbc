"""Relational storage shared by the services: SQLite by default, PostgreSQL by
one setting (SQLAlchemy async + Alembic migrations)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from mlmesh_chassis.errors import Unavailable

log = logging.getLogger("mlmesh.database")

_OUTAGES = (exc.OperationalError, exc.InterfaceError, OSError, TimeoutError)


class Database:
    """An engine and its two kinds of transaction, on SQLite or PostgreSQL.

    ``read()`` for queries; ``write()`` for a transaction that commits on
    success. Writes are serialized (an asyncio lock on SQLite; a
    transaction-level advisory lock keyed by ``write_lock_key`` on
    PostgreSQL), so rows they append (event logs) commit in sequence order.
    Services may share one PostgreSQL database: each has its own lock keys
    (derived from its name and version table, see ``advisory_lock_key``),
    so one service's writes or migrations never wait for another's.
    An unreachable database raises Unavailable with RetryInfo; PostgreSQL's
    pool pings connections, so the service recovers by itself.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        migrations: Path | None = None,
        version_table: str = "alembic_version",
        connect_timeout: float = 2.0,
        write_lock_key: int | None = None,
    ) -> None:
        self.url = url
        self.name = name
        self.migrations = migrations
        # Each service records its schema version in its own table, so
        # services can share one database.
        self.version_table = version_table
        # Advisory locks (PostgreSQL) are per database, not per schema: one
        # key per service, so services sharing a database do not serialize
        # each other. Replicas of one service derive the same keys.
        self.write_lock_key = (
            advisory_lock_key(name, version_table, "write")
            if write_lock_key is None
            else write_lock_key
        )
        self.migration_lock_key = advisory_lock_key(name, version_table, "migrate")
        self.is_sqlite = url.startswith("sqlite")
        self._inline_reader: sa.Engine | None = None
        if self.is_sqlite:
            path = url.split(":///", 1)[1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(url, connect_args={"timeout": 30})
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            # SQLite reads run inline on the event loop: a WAL-mode read of a
            # local file takes microseconds and never waits for a writer, while
            # a hop to aiosqlite's thread costs far more than the read itself.
            self._inline_reader = sa.create_engine(
                url.replace("+aiosqlite", ""), connect_args={"timeout": 30}
            )
            event.listen(self._inline_reader, "connect", _sqlite_pragmas)
        else:
            self.engine = create_async_engine(
                url,
                pool_pre_ping=True,
                pool_size=10,
                max_overflow=10,
                pool_timeout=connect_timeout,
                connect_args={"connect_timeout": max(int(connect_timeout), 1)},
            )
        self._sqlite_writer = asyncio.Lock()

    async def migrate(self) -> None:
        """Brings the schema to the newest migration (alembic upgrade head)."""
        if self.migrations is None:
            return
        with self._translate_outage():
            async with self.engine.begin() as conn:
                if not self.is_sqlite:  # replicas starting together migrate one at a time
                    await conn.execute(
                        sa.select(sa.func.pg_advisory_xact_lock(self.migration_lock_key))
                    )
                await conn.run_sync(_upgrade, self.migrations, self.version_table)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        with self._translate_outage():
            if self._inline_reader is not None:
                with self._inline_reader.connect() as inline:
                    yield _InlineConnection(inline)  # type: ignore[misc]
                return
            async with self.engine.connect() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A serialized transaction; commits on success."""
        with self._translate_outage():
            if self.is_sqlite:
                async with self._sqlite_writer, self.engine.begin() as conn:
                    yield conn
            else:
                async with self.engine.begin() as conn:
                    await conn.execute(
                        sa.select(sa.func.pg_advisory_xact_lock(self.write_lock_key))
                    )
                    yield conn

    @contextlib.contextmanager
    def _translate_outage(self) -> Iterator[None]:
        try:
            yield
        except _OUTAGES as error:
            log.warning("database unavailable: %s", str(error).splitlines()[0])
            raise Unavailable(
                f"the {self.name} database is unavailable; retry shortly", retry_after_s=1.0
            ) from error
        except exc.DBAPIError as error:
            if error.connection_invalidated:
                raise Unavailable(
                    f"the {self.name} database connection was lost; retry shortly",
                    retry_after_s=1.0,
                ) from error
            raise

    async def close(self) -> None:
        await self.engine.dispose()
        if self._inline_reader is not None:
            self._inline_reader.dispose()


def advisory_lock_key(name: str, version_table: str, purpose: str) -> int:
    """A PostgreSQL advisory lock key (signed 64-bit) for one service's
    ``purpose`` ("write", "migrate"): stable across processes and releases
    (a hash of the service's name and version table, not Python's hash())."""
    digest = hashlib.blake2b(
        f"mlmesh:{name}:{version_table}:{purpose}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


class _InlineConnection:
    """A sync connection behind the AsyncConnection methods the store uses."""

    def __init__(self, connection: sa.Connection) -> None:
        self._connection = connection

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return self._connection.execute(statement, parameters)

    async def scalar(self, statement: Any, parameters: Any = None) -> Any:
        return self._connection.scalar(statement, parameters)

    async def scalars(self, statement: Any, parameters: Any = None) -> Any:
        return self._connection.scalars(statement, parameters)


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable under WAL; fsync at checkpoints
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _upgrade(connection: sa.Connection, migrations: Path, version_table: str) -> None:
    # One Alembic environment (mlmesh_chassis/migrations) for every service;
    # each service brings only its versions/ folder.
    config = Config()
    config.set_main_option("path_separator", "os")
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.set_main_option("version_locations", str(migrations / "versions"))
    config.attributes["connection"] = connection
    config.attributes["version_table"] = version_table
    command.upgrade(config, "head")

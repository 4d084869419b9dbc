"""Tables, engine, and transactions that translate database outages.

SQLite (default) and PostgreSQL run the same code. Writes that append to the
event log are serialized (an asyncio lock on SQLite, a transaction-level
advisory lock on PostgreSQL), so event sequence numbers commit in order and a
watcher never skips one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from mlmesh_chassis.errors import Unavailable
from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = logging.getLogger("mlmesh.registry.db")
metadata = sa.MetaData()
_EVENT_LOCK_KEY = 0x6D6C6D  # any constant shared by every registry replica

models = sa.Table(
    "models",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("latest_version", sa.BigInteger, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)
model_tags = sa.Table(
    "model_tags",
    metadata,
    sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("key", sa.String(63), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)
versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("format", sa.String(63), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("artifact_path", sa.Text, nullable=False),
    sa.Column("lineage", sa.LargeBinary, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)
version_tags = sa.Table(
    "version_tags",
    metadata,
    sa.Column("model", sa.String(63), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("key", sa.String(63), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
    sa.ForeignKeyConstraint(
        ["model", "version"], ["model_versions.model", "model_versions.version"]
    ),
)
aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("alias", sa.String(63), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)
experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("model", sa.String(63), sa.ForeignKey("models.name"), nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),  # serialized Experiment
)
# Append-only: alias and experiment changes, in commit order.
events = sa.Table(
    "events",
    metadata,
    sa.Column(
        "sequence",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("model", sa.String(63), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),  # "alias" | "experiment"
    sa.Column("subject", sa.String(63), nullable=False),  # alias or experiment name
    sa.Column("body", sa.LargeBinary, nullable=False),  # serialized AliasEvent/ExperimentEvent
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)

_OUTAGES = (exc.OperationalError, exc.InterfaceError, OSError, TimeoutError)


class Database:
    """The registry's engine and its two kinds of transaction."""

    def __init__(self, url: str, connect_timeout: float = 2.0) -> None:
        self.url = url
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
        async with self.engine.begin() as conn:
            await conn.run_sync(_upgrade)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        with _translate_outage():
            if self._inline_reader is not None:
                with self._inline_reader.connect() as inline:
                    yield _InlineConnection(inline)  # type: ignore[misc]
                return
            async with self.engine.connect() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that may append events; commits on success."""
        with _translate_outage():
            if self.is_sqlite:
                async with self._sqlite_writer, self.engine.begin() as conn:
                    yield conn
            else:
                async with self.engine.begin() as conn:
                    await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_EVENT_LOCK_KEY)))
                    yield conn

    async def close(self) -> None:
        await self.engine.dispose()
        if self._inline_reader is not None:
            self._inline_reader.dispose()


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


@contextlib.contextmanager
def _translate_outage() -> Iterator[None]:
    try:
        yield
    except _OUTAGES as error:
        log.warning("database unavailable: %s", str(error).splitlines()[0])
        raise Unavailable(
            "the registry database is unavailable; retry shortly", retry_after_s=1.0
        ) from error
    except exc.DBAPIError as error:
        if error.connection_invalidated:
            raise Unavailable(
                "the registry database connection was lost; retry shortly", retry_after_s=1.0
            ) from error
        raise


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _upgrade(connection: sa.Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")

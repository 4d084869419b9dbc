"""What the registry store's aggregates share: one database and its
transactions, the event log they append to, the lookups several of them make
(a model, a version by number or by alias, tags) and list pages."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh_chassis.database import Database
from mlmesh_chassis.errors import InvalidArgument, NotFound
from mlmesh_chassis.pagination import encode_page_token
from sqlalchemy.ext.asyncio import AsyncConnection

from mlmesh_registry import db
from mlmesh_registry.validation import MAX_PAGE_BYTES


class StoreBase:
    """An aggregate's access to the database. Every write transaction wakes
    the event log's watchers once it commits (``changes``, shared by all)."""

    def __init__(self, database: Database, changes: asyncio.Condition) -> None:
        self.db = database
        self.changes = changes

    def read(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        return self.db.read()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction; once it commits, watchers are woken."""
        async with self.db.write() as c:
            yield c
        async with self.changes:
            self.changes.notify_all()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None:  # SQLite returns naive datetimes
        value = value.replace(tzinfo=dt.UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


# ---- common lookups ---------------------------------------------------------


async def model_exists(c: AsyncConnection, name: str) -> bool:
    return bool(await c.scalar(sa.select(db.models.c.name).where(db.models.c.name == name)))


async def load_model(c: AsyncConnection, name: str) -> pb.Model:
    row = (await c.execute(sa.select(db.models).where(db.models.c.name == name))).first()
    if row is None:
        raise NotFound("model", name)
    tags = await read_tags(c, db.model_tags, db.model_tags.c.model == name)
    return pb.Model(
        name=row.name,
        description=row.description,
        tags=tags,
        latest_version=row.latest_version,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )


async def load_version(c: AsyncConnection, model: str, version: int) -> pb.ModelVersion:
    """The version, or NOT_FOUND naming what is missing: the model or the version."""
    found = await find_version(c, model, version=version)
    if found is None:
        if not await model_exists(c, model):
            raise NotFound("model", model)
        raise NotFound("model version", f"{model}/{version}")
    return found


async def find_version(
    c: AsyncConnection, model: str, version: int | None = None, alias: str | None = None
) -> pb.ModelVersion | None:
    """A version by number or by alias, in two prepared queries: its row,
    then its tags and aliases together."""
    if alias is not None:
        row = (await c.execute(_VERSION_BY_ALIAS, {"model": model, "alias": alias})).first()
    else:
        row = (await c.execute(_VERSION_BY_NUMBER, {"model": model, "version": version})).first()
    if row is None:
        return None
    tags: dict[str, str] = {}
    aliases: list[str] = []
    for kind, name, value in await c.execute(
        _VERSION_LABELS, {"model": model, "version": row.version}
    ):
        if kind == "tag":
            tags[name] = value
        else:
            aliases.append(name)
    return pb.ModelVersion(
        model=row.model,
        version=row.version,
        description=row.description,
        tags=tags,
        format=row.format,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        lineage=pb.Lineage.FromString(row.lineage),
        create_time=timestamp(row.create_time),
        aliases=sorted(aliases),
    )


# Hot-path statements, built once (resolve runs on every serving lookup).
_V, _T, _A = db.versions, db.version_tags, db.aliases
_VERSION_BY_NUMBER = sa.select(_V).where(
    _V.c.model == sa.bindparam("model"), _V.c.version == sa.bindparam("version")
)
_VERSION_BY_ALIAS = sa.select(_V).where(
    _V.c.model == sa.bindparam("model"),
    _V.c.version
    == sa.select(_A.c.version)
    .where(_A.c.model == sa.bindparam("model"), _A.c.alias == sa.bindparam("alias"))
    .scalar_subquery(),
)
_VERSION_LABELS = (
    sa.select(sa.literal("tag").label("kind"), _T.c.key.label("name"), _T.c.value)
    .where(_T.c.model == sa.bindparam("model"), _T.c.version == sa.bindparam("version"))
    .union_all(
        sa.select(sa.literal("alias"), _A.c.alias, sa.literal("")).where(
            _A.c.model == sa.bindparam("model"), _A.c.version == sa.bindparam("version")
        )
    )
)


# ---- tags -------------------------------------------------------------------


async def read_tags(c: AsyncConnection, table: sa.Table, *where: Any) -> dict[str, str]:
    rows = await c.execute(sa.select(table.c.key, table.c.value).where(*where))
    return {row.key: row.value for row in rows}


async def put_tags(
    c: AsyncConnection, table: sa.Table, owner: Mapping[str, Any], tags: Mapping[str, str]
) -> None:
    """Adds ``tags`` to the row named by ``owner`` (its key columns)."""
    if tags:
        await c.execute(table.insert(), [{**owner, "key": k, "value": v} for k, v in tags.items()])


async def replace_tags(
    c: AsyncConnection, table: sa.Table, owner: Mapping[str, Any], tags: Mapping[str, str]
) -> None:
    await c.execute(table.delete().where(*(table.c[k] == v for k, v in owner.items())))
    await put_tags(c, table, owner, tags)


def tagged(
    stmt: sa.Select[Any], table: sa.Table, owner: Mapping[str, Any], tags: Mapping[str, str]
) -> sa.Select[Any]:
    """``stmt`` narrowed to the rows holding every one of ``tags``; ``owner``
    maps the tag table's key columns to the listed table's."""
    for key, value in tags.items():
        stmt = stmt.where(
            sa.exists().where(
                *(table.c[k] == column for k, column in owner.items()),
                table.c.key == key,
                table.c.value == value,
            )
        )
    return stmt


# ---- the event log ----------------------------------------------------------


async def append_event(
    c: AsyncConnection,
    model: str,
    kind: str,
    subject: str,
    event: pb.AliasEvent | pb.ExperimentEvent,
) -> None:
    """Appends ``event`` (kind "alias" or "experiment", about ``subject``) in
    the caller's transaction, setting its sequence and create_time."""
    created = now()
    event.create_time.CopyFrom(timestamp(created))
    sequence = await c.scalar(
        db.events.insert()
        .values(model=model, kind=kind, subject=subject, body=b"", create_time=created)
        .returning(db.events.c.sequence)
    )
    event.sequence = sequence
    await c.execute(
        db.events.update()
        .where(db.events.c.sequence == sequence)
        .values(body=event.SerializeToString())
    )


# ---- lists and updates ------------------------------------------------------


async def page(
    keys: Sequence[Any],
    size: int,
    load: Callable[[Any], Awaitable[Message]],
    query: Mapping[str, Any],
) -> tuple[list[Any], str]:
    """Loads the items of ``keys`` (up to ``size + 1`` of them, in list order)
    into a page of at most ``size`` items and MAX_PAGE_BYTES serialized (one
    item at least). Returns the page and the token that continues after it
    ("" where the list ends)."""
    items: list[Any] = []
    total = 0
    for key in keys[:size]:
        item = await load(key)
        item_bytes = item.ByteSize() + 6  # plus its field tag and length prefix
        if items and total + item_bytes > MAX_PAGE_BYTES:
            return items, encode_page_token(keys[len(items) - 1], query)
        items.append(item)
        total += item_bytes
    return items, encode_page_token(keys[size - 1], query) if len(keys) > size else ""


def loaded(items: Mapping[Any, Message]) -> Callable[[Any], Awaitable[Message]]:
    """``page``'s loader for items already read."""

    async def load(key: Any) -> Message:
        return items[key]

    return load


def check_mask(paths: Sequence[str], allowed: set[str]) -> None:
    if not paths:
        raise InvalidArgument.field("update_mask", f"name at least one of {sorted(allowed)}")
    unknown = [p for p in paths if p not in allowed]
    if unknown:
        raise InvalidArgument.field(
            "update_mask", f"cannot update {unknown}; allowed: {sorted(allowed)}"
        )

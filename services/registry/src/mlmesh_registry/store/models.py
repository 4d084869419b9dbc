"""Models: a name, a description, tags and the number of its newest version.

The fields' rules (the name's pattern, the description's length, the tags)
are the contract's, checked by the chassis before a call gets here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh_chassis.errors import AlreadyExists
from mlmesh_chassis.pagination import decode_page_token
from sqlalchemy.ext.asyncio import AsyncConnection

from mlmesh_registry import db
from mlmesh_registry.store.base import (
    StoreBase,
    check_mask,
    load_model,
    model_exists,
    now,
    page,
    put_tags,
    replace_tags,
    tagged,
)
from mlmesh_registry.validation import page_size


class ModelStore(StoreBase):
    async def create(self, model: pb.Model) -> pb.Model:
        async with self.write() as c:
            if await model_exists(c, model.name):
                raise AlreadyExists("model", model.name)
            await insert_model(c, model.name, model.description, model.tags)
            return await load_model(c, model.name)

    async def get(self, name: str) -> pb.Model:
        async with self.read() as c:
            return await load_model(c, name)

    async def exists(self, name: str) -> bool:
        async with self.read() as c:
            return await model_exists(c, name)

    async def list_page(
        self, size: int, token: str, name_prefix: str, tags: Mapping[str, str]
    ) -> tuple[list[pb.Model], str]:
        tags = dict(tags)
        size = page_size(size)
        query = {"prefix": name_prefix, "tags": tags}
        after = decode_page_token(token, query)
        m = db.models
        stmt = sa.select(m.c.name).order_by(m.c.name).limit(size + 1)
        if name_prefix:
            stmt = stmt.where(m.c.name.startswith(name_prefix, autoescape=True))
        if after is not None:
            stmt = stmt.where(m.c.name > after)
        stmt = tagged(stmt, db.model_tags, {"model": m.c.name}, tags)
        async with self.read() as c:
            names = list((await c.scalars(stmt)).all())
            return await page(names, size, lambda name: load_model(c, name), query)

    async def update(self, model: pb.Model, paths: Sequence[str]) -> pb.Model:
        """Sets the fields ``paths`` names. The request's partial model is
        checked whole by the chassis (its unset fields break no rule), so the
        updated model keeps the rules."""
        check_mask(paths, {"description", "tags"})
        async with self.write() as c:
            await load_model(c, model.name)
            values: dict[str, Any] = {"update_time": now()}
            if "description" in paths:
                values["description"] = model.description
            await c.execute(
                db.models.update().where(db.models.c.name == model.name).values(**values)
            )
            if "tags" in paths:
                await replace_tags(c, db.model_tags, {"model": model.name}, model.tags)
            return await load_model(c, model.name)


async def insert_model(
    c: AsyncConnection,
    name: str,
    description: str = "",
    tags: Mapping[str, str] | None = None,
    latest_version: int = 0,
) -> None:
    """A new model row and its tags (the caller has checked the name is free)."""
    created = now()
    await c.execute(
        db.models.insert().values(
            name=name,
            description=description,
            latest_version=latest_version,
            create_time=created,
            update_time=created,
        )
    )
    await put_tags(c, db.model_tags, {"model": name}, tags or {})

"""Aliases: a model's named pointers at versions (``champion`` -> 3). Every
change is an AliasEvent in the event log, written in the same transaction,
and a rollback moves an alias back to where its last change took it from.
The names, versions and reasons are checked by the chassis (the contract's
rules); an alias points only at a version that exists."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh_chassis.errors import Aborted, FailedPrecondition, NotFound
from mlmesh_chassis.pagination import decode_page_token
from sqlalchemy.ext.asyncio import AsyncConnection

from mlmesh_registry import db
from mlmesh_registry.store.base import (
    StoreBase,
    append_event,
    load_model,
    load_version,
    loaded,
    now,
    page,
    timestamp,
)
from mlmesh_registry.validation import page_size

Action = pb.AliasEvent.Action
# How far back a rollback looks for the alias' last real change.
_ROLLBACK_LOOKBACK = 100


class AliasStore(StoreBase):
    async def set(
        self,
        model: str,
        alias: str,
        version: int,
        reason: str,
        actor: str,
        expected_version: int | None,
    ) -> tuple[pb.Alias, pb.AliasEvent | None]:
        """Points the alias at ``version`` (compare-and-set when
        ``expected_version`` is given; 0: the alias must not exist). The event
        is None where the alias already pointed there: nothing moved."""
        async with self.write() as c:
            await load_version(c, model, version)
            current = await _current_version(c, model, alias)
            if expected_version is not None and (current or 0) != expected_version:
                raise Aborted(
                    f"alias {model}@{alias} points at {current or 0}, not {expected_version}",
                    model=model,
                    alias=alias,
                    current_version=current or 0,
                    expected_version=expected_version,
                )
            if current == version:
                # Nothing moves, so nothing is recorded: a recorded no-op would
                # become the change a rollback undoes, and lose its target.
                return await _load_alias(c, model, alias), None
            action = Action.ACTION_CREATED if current is None else Action.ACTION_MOVED
            return await _move(c, model, alias, current, version, action, reason, actor)

    async def get(self, model: str, alias: str) -> pb.Alias:
        async with self.read() as c:
            return await _load_alias(c, model, alias)

    async def list_page(self, model: str, size: int, token: str) -> tuple[list[pb.Alias], str]:
        size = page_size(size)
        query = {"model": model}
        after = decode_page_token(token, query)
        a = db.aliases
        stmt = sa.select(a).where(a.c.model == model).order_by(a.c.alias).limit(size + 1)
        if after is not None:
            stmt = stmt.where(a.c.alias > after)
        async with self.read() as c:
            await load_model(c, model)
            rows = list((await c.execute(stmt)).all())
        aliases = {row.alias: _alias(row) for row in rows}
        return await page(list(aliases), size, loaded(aliases), query)

    async def delete(self, model: str, alias: str, reason: str, actor: str) -> pb.AliasEvent:
        async with self.write() as c:
            current = await _existing_version(c, model, alias)
            await c.execute(
                db.aliases.delete().where(db.aliases.c.model == model, db.aliases.c.alias == alias)
            )
            event = pb.AliasEvent(
                model=model,
                alias=alias,
                action=Action.ACTION_DELETED,
                from_version=current,
                to_version=0,
                actor=actor,
                reason=reason,
            )
            await append_event(c, model, "alias", alias, event)
        return event

    async def rollback(
        self, model: str, alias: str, reason: str, actor: str
    ) -> tuple[pb.Alias, pb.AliasEvent]:
        """Moves the alias back to where its last change took it from."""
        async with self.write() as c:
            current = await _existing_version(c, model, alias)
            e = db.events
            bodies = await c.scalars(
                sa.select(e.c.body)
                .where(e.c.model == model, e.c.kind == "alias", e.c.subject == alias)
                .order_by(e.c.sequence.desc())
                .limit(_ROLLBACK_LOOKBACK)
            )
            # The last real change: no-op moves (recorded before set stopped
            # recording them) took the alias nowhere.
            last = next(
                (
                    event
                    for event in map(pb.AliasEvent.FromString, bodies)
                    if event.from_version != event.to_version
                ),
                None,
            )
            if last is None or last.from_version == 0:
                raise FailedPrecondition(
                    f"alias {model}@{alias} has no previous version to roll back to",
                    model=model,
                    alias=alias,
                )
            target = last.from_version
            await load_version(c, model, target)
            return await _move(
                c, model, alias, current, target, Action.ACTION_ROLLED_BACK, reason, actor
            )

    async def history(
        self, model: str, alias: str, size: int, token: str
    ) -> tuple[list[pb.AliasEvent], str]:
        """The alias' changes, oldest first (every alias of the model where
        ``alias`` is empty)."""
        size = page_size(size)
        query = {"model": model, "alias": alias}
        after = decode_page_token(token, query)
        e = db.events
        stmt = (
            sa.select(e.c.sequence, e.c.body)
            .where(e.c.model == model, e.c.kind == "alias")
            .order_by(e.c.sequence)
            .limit(size + 1)
        )
        if alias:
            stmt = stmt.where(e.c.subject == alias)
        if after is not None:
            stmt = stmt.where(e.c.sequence > int(after))
        async with self.read() as c:
            await load_model(c, model)
            rows = list((await c.execute(stmt)).all())
        events = {row.sequence: pb.AliasEvent.FromString(row.body) for row in rows}
        return await page(list(events), size, loaded(events), query)


async def _current_version(c: AsyncConnection, model: str, alias: str) -> int | None:
    value = await c.scalar(
        sa.select(db.aliases.c.version).where(
            db.aliases.c.model == model, db.aliases.c.alias == alias
        )
    )
    return None if value is None else int(value)


async def _existing_version(c: AsyncConnection, model: str, alias: str) -> int:
    """The alias' version; NOT_FOUND for the model or, where it exists, the alias."""
    current = await _current_version(c, model, alias)
    if current is None:
        await load_model(c, model)
        raise NotFound("alias", f"{model}@{alias}")
    return current


async def _load_alias(c: AsyncConnection, model: str, alias: str) -> pb.Alias:
    row = (
        await c.execute(
            sa.select(db.aliases).where(db.aliases.c.model == model, db.aliases.c.alias == alias)
        )
    ).first()
    if row is None:
        await load_model(c, model)
        raise NotFound("alias", f"{model}@{alias}")
    return _alias(row)


async def _move(
    c: AsyncConnection,
    model: str,
    alias: str,
    current: int | None,
    version: int,
    action: pb.AliasEvent.Action,
    reason: str,
    actor: str,
) -> tuple[pb.Alias, pb.AliasEvent]:
    moved = now()
    if current is None:
        await c.execute(
            db.aliases.insert().values(model=model, alias=alias, version=version, update_time=moved)
        )
    else:
        await c.execute(
            db.aliases.update()
            .where(db.aliases.c.model == model, db.aliases.c.alias == alias)
            .values(version=version, update_time=moved)
        )
    event = pb.AliasEvent(
        model=model,
        alias=alias,
        action=action,
        from_version=current or 0,
        to_version=version,
        actor=actor,
        reason=reason,
    )
    await append_event(c, model, "alias", alias, event)
    return pb.Alias(model=model, alias=alias, version=version, update_time=timestamp(moved)), event


def _alias(row: Any) -> pb.Alias:
    return pb.Alias(
        model=row.model,
        alias=row.alias,
        version=row.version,
        update_time=timestamp(row.update_time),
    )

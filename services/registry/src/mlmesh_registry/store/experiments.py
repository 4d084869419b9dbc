"""Experiments: traffic split across a model's versions by weighted arms
(with an optional shadow version), sticky per caller. Every change is an
ExperimentEvent in the event log, written in the same transaction; a
stopped experiment no longer changes.

The Experiment rules of the contract (names, arms, weights' range, the
stickiness key, the shadow) are checked with protovalidate on the experiment
as it would be stored, together with the rules the contract cannot say: the
weights sum to 100 and every version routed to exists. On create the chassis
has checked the request already; on update the request holds only the
changed fields, so the merged result is what is checked."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import sqlalchemy as sa
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh_chassis.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from mlmesh_chassis.pagination import decode_page_token
from mlmesh_chassis.validation import violations_of
from sqlalchemy.ext.asyncio import AsyncConnection

from mlmesh_registry import db
from mlmesh_registry.store.base import (
    StoreBase,
    append_event,
    check_mask,
    load_model,
    load_version,
    loaded,
    now,
    page,
    timestamp,
)
from mlmesh_registry.validation import page_size

Action = pb.ExperimentEvent.Action
DEFAULT_STICKINESS_KEY = "api_key"
# Violations an INVALID_ARGUMENT's message names (its BadRequest lists all).
_MESSAGE_VIOLATIONS = 3
_UPDATABLE = {"arms", "shadow", "stickiness_key", "description"}


class ExperimentStore(StoreBase):
    async def create(self, experiment: pb.Experiment) -> pb.Experiment:
        stored = pb.Experiment()
        stored.CopyFrom(experiment)
        stored.stickiness_key = stored.stickiness_key or DEFAULT_STICKINESS_KEY
        await _check_rules(stored)
        async with self.write() as c:
            await load_model(c, stored.model)
            x = db.experiments
            if await c.scalar(sa.select(x.c.name).where(x.c.name == stored.name)):
                raise AlreadyExists("experiment", stored.name)
            await _check_versions(c, stored)
            created = timestamp(now())
            stored.state = pb.EXPERIMENT_STATE_RUNNING
            stored.create_time.CopyFrom(created)
            stored.update_time.CopyFrom(created)
            await c.execute(
                x.insert().values(
                    name=stored.name,
                    model=stored.model,
                    state=stored.state,
                    body=stored.SerializeToString(),
                )
            )
            await _record(c, stored, Action.ACTION_CREATED)
        return stored

    async def get(self, name: str) -> pb.Experiment:
        async with self.read() as c:
            return await _load(c, name)

    async def list_page(
        self, model: str, state: int, size: int, token: str
    ) -> tuple[list[pb.Experiment], str]:
        """Experiments by name, of one model and in one state where given."""
        size = page_size(size)
        query = {"model": model, "state": state}
        after = decode_page_token(token, query)
        x = db.experiments
        stmt = sa.select(x.c.name, x.c.body).order_by(x.c.name).limit(size + 1)
        if model:
            stmt = stmt.where(x.c.model == model)
        if state:
            stmt = stmt.where(x.c.state == state)
        if after is not None:
            stmt = stmt.where(x.c.name > after)
        async with self.read() as c:
            rows = list((await c.execute(stmt)).all())
        experiments = {row.name: pb.Experiment.FromString(row.body) for row in rows}
        return await page(list(experiments), size, loaded(experiments), query)

    async def update(self, experiment: pb.Experiment, paths: Sequence[str]) -> pb.Experiment:
        """Sets the fields ``paths`` names from ``experiment`` (a partial one:
        its name and those fields), where the experiment that makes keeps
        every rule.

        The rules are checked before the write transaction (they take a
        while: the CEL interpreter), on the experiment as read; should it
        change before the write, the result is checked again inside."""
        check_mask(paths, _UPDATABLE)
        async with self.read() as c:
            before = _running(await _load(c, experiment.name))
        await _check_rules(_merged(before, experiment, paths))
        async with self.write() as c:
            stored = _running(await _load(c, experiment.name))
            merged = _merged(stored, experiment, paths)
            if stored != before:
                await _check_rules(merged)
            await _check_versions(c, merged)
            return await _save(c, merged, Action.ACTION_UPDATED)

    async def stop(self, name: str) -> pb.Experiment:
        """Stops the experiment (a no-op where it is stopped already)."""
        async with self.write() as c:
            stored = await _load(c, name)
            if stored.state == pb.EXPERIMENT_STATE_STOPPED:
                return stored
            stored.state = pb.EXPERIMENT_STATE_STOPPED
            return await _save(c, stored, Action.ACTION_STOPPED)


async def _load(c: AsyncConnection, name: str) -> pb.Experiment:
    body = await c.scalar(sa.select(db.experiments.c.body).where(db.experiments.c.name == name))
    if body is None:
        raise NotFound("experiment", name)
    return pb.Experiment.FromString(body)


def _running(stored: pb.Experiment) -> pb.Experiment:
    """``stored``, or FAILED_PRECONDITION where it is stopped (a stopped
    experiment no longer changes)."""
    if stored.state == pb.EXPERIMENT_STATE_STOPPED:
        raise FailedPrecondition(f"experiment {stored.name!r} is stopped", experiment=stored.name)
    return stored


def _merged(stored: pb.Experiment, change: pb.Experiment, paths: Sequence[str]) -> pb.Experiment:
    """A copy of ``stored`` with the fields ``paths`` names taken from
    ``change`` (arms and shadow whole; an empty stickiness key is the
    default, as on create)."""
    merged = pb.Experiment()
    merged.CopyFrom(stored)
    for path in paths:
        if path == "arms":
            del merged.arms[:]
            merged.arms.extend(change.arms)
        elif path == "shadow":
            merged.ClearField("shadow")
            if change.HasField("shadow"):
                merged.shadow.CopyFrom(change.shadow)
        else:
            setattr(merged, path, getattr(change, path))
    merged.stickiness_key = merged.stickiness_key or DEFAULT_STICKINESS_KEY
    return merged


def _violations(experiment: pb.Experiment) -> list[FieldViolation]:
    """The contract's Experiment rules (protovalidate) and the one it cannot
    express (the weights sum to 100), with paths under ``experiment`` as in
    the requests."""
    violations = [
        FieldViolation(f"experiment.{v.field}" if v.field else "experiment", v.description)
        for v in violations_of(experiment)
    ]
    total = sum(arm.weight for arm in experiment.arms)
    if experiment.arms and total != 100:
        violations.append(
            FieldViolation("experiment.arms", f"weights must sum to 100 (got {total})")
        )
    return violations


async def _check_rules(experiment: pb.Experiment) -> None:
    """Every rule at once, as one INVALID_ARGUMENT listing each violation.
    In a worker thread: the rules are interpreted (cel-python), tens of
    milliseconds for a few arms, and the caller chooses the arms' number."""
    violations = await asyncio.to_thread(_violations, experiment)
    if violations:
        raise InvalidArgument.listing(violations, _MESSAGE_VIOLATIONS, experiment=experiment.name)


async def _check_versions(c: AsyncConnection, experiment: pb.Experiment) -> None:
    """Every version the experiment routes to exists (NOT_FOUND)."""
    versions = {arm.version for arm in experiment.arms}
    if experiment.HasField("shadow"):
        versions.add(experiment.shadow.version)
    for version in sorted(versions):
        await load_version(c, experiment.model, version)


async def _save(c: AsyncConnection, stored: pb.Experiment, action: Action) -> pb.Experiment:
    stored.update_time.CopyFrom(timestamp(now()))
    await c.execute(
        db.experiments.update()
        .where(db.experiments.c.name == stored.name)
        .values(state=stored.state, body=stored.SerializeToString())
    )
    await _record(c, stored, action)
    return stored


async def _record(c: AsyncConnection, stored: pb.Experiment, action: Action) -> None:
    event = pb.ExperimentEvent(action=action, experiment=stored)
    await append_event(c, stored.model, "experiment", stored.name, event)

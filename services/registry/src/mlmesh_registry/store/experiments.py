"""Experiments: traffic split across a model's versions by weighted arms
(with an optional shadow version), sticky per caller. Every change is an
ExperimentEvent in the event log, written in the same transaction; a
stopped experiment no longer changes."""

from __future__ import annotations

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
from mlmesh_registry.validation import (
    ALIAS_NAME,
    MAX_DESCRIPTION_CHARS,
    check_name,
    check_stickiness_key,
    decode_page_token,
    page_size,
)

Action = pb.ExperimentEvent.Action
DEFAULT_STICKINESS_KEY = "api_key"


class ExperimentStore(StoreBase):
    async def create(self, experiment: pb.Experiment) -> pb.Experiment:
        check_name("experiment.name", experiment.name)
        check_name("experiment.model", experiment.model)
        async with self.write() as c:
            await load_model(c, experiment.model)
            x = db.experiments
            if await c.scalar(sa.select(x.c.name).where(x.c.name == experiment.name)):
                raise AlreadyExists("experiment", experiment.name)
            stored = pb.Experiment()
            stored.CopyFrom(experiment)
            stored.stickiness_key = stored.stickiness_key or DEFAULT_STICKINESS_KEY
            await _check(c, stored)
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
        check_name("name", name)
        async with self.read() as c:
            return await _load(c, name)

    async def list_page(
        self, model: str, state: int, size: int, token: str
    ) -> tuple[list[pb.Experiment], str]:
        """Experiments by name, of one model and in one state where given."""
        if model:
            check_name("model", model)
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
        check_name("experiment.name", experiment.name)
        check_mask(paths, {"arms", "shadow", "stickiness_key", "description"})
        async with self.write() as c:
            stored = await _load(c, experiment.name)
            if stored.state == pb.EXPERIMENT_STATE_STOPPED:
                raise FailedPrecondition(
                    f"experiment {stored.name!r} is stopped", experiment=stored.name
                )
            for path in paths:
                if path == "arms":
                    del stored.arms[:]
                    stored.arms.extend(experiment.arms)
                elif path == "shadow":
                    stored.ClearField("shadow")
                    if experiment.HasField("shadow"):
                        stored.shadow.CopyFrom(experiment.shadow)
                else:
                    setattr(stored, path, getattr(experiment, path))
            await _check(c, stored)
            return await _save(c, stored, Action.ACTION_UPDATED)

    async def stop(self, name: str) -> pb.Experiment:
        """Stops the experiment (a no-op where it is stopped already)."""
        check_name("name", name)
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


async def _check(c: AsyncConnection, experiment: pb.Experiment) -> None:
    """Every rule at once (one INVALID_ARGUMENT listing each violation), then
    that every version it routes to exists."""
    violations: list[FieldViolation] = []
    if not experiment.arms:
        violations.append(FieldViolation("experiment.arms", "at least one arm is required"))
    names = [arm.name for arm in experiment.arms]
    if len(set(names)) != len(names):
        violations.append(FieldViolation("experiment.arms", "arm names must be unique"))
    for i, arm in enumerate(experiment.arms):
        if not ALIAS_NAME.fullmatch(arm.name):
            violations.append(
                FieldViolation(f"experiment.arms[{i}].name", f"must match {ALIAS_NAME.pattern}")
            )
        if not 0 <= arm.weight <= 100:
            violations.append(
                FieldViolation(f"experiment.arms[{i}].weight", "must be between 0 and 100")
            )
    total = sum(arm.weight for arm in experiment.arms)
    if experiment.arms and total != 100:
        violations.append(
            FieldViolation("experiment.arms", f"weights must sum to 100 (got {total})")
        )
    try:
        check_stickiness_key("experiment.stickiness_key", experiment.stickiness_key)
    except InvalidArgument as error:
        violations.extend(error.violations)
    if len(experiment.description) > MAX_DESCRIPTION_CHARS:
        violations.append(
            FieldViolation("experiment.description", f"at most {MAX_DESCRIPTION_CHARS} characters")
        )
    if experiment.HasField("shadow") and not 0 <= experiment.shadow.percent <= 100:
        violations.append(FieldViolation("experiment.shadow.percent", "must be between 0 and 100"))
    if violations:
        raise InvalidArgument("invalid experiment", violations, experiment=experiment.name)
    versions = {arm.version for arm in experiment.arms}
    if experiment.HasField("shadow"):
        versions.add(experiment.shadow.version)
    for version in versions:
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

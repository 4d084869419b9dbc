"""The registry's domain operations (no gRPC here).

Proto messages from the contract are the data carriers; every rule about
names, versions, aliases and experiments lives here, and every change to an
alias or experiment appends to the event log in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh_chassis.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from mlmesh_registry import db
from mlmesh_registry.validation import (
    ALIAS_NAME,
    MAX_DESCRIPTION_CHARS,
    MAX_PAGE_BYTES,
    MAX_REASON_CHARS,
    check_name,
    check_stickiness_key,
    check_tags,
    check_text,
    decode_page_token,
    encode_page_token,
    page_size,
)

AliasAction = pb.AliasEvent.Action
ExperimentAction = pb.ExperimentEvent.Action


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None:  # SQLite returns naive datetimes
        value = value.replace(tzinfo=dt.UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


class RegistryStore:
    def __init__(self, database: db.Database) -> None:
        self.db = database
        self._event_signal = asyncio.Condition()

    # ---- models -------------------------------------------------------------

    async def create_model(
        self, model: pb.Model, *, conn: AsyncConnection | None = None
    ) -> pb.Model:
        check_name("model.name", model.name)
        check_text("model.description", model.description, MAX_DESCRIPTION_CHARS)
        tags = check_tags("model.tags", model.tags)
        now = _now()
        async with self._maybe_write(conn) as c:
            exists = await c.scalar(
                sa.select(db.models.c.name).where(db.models.c.name == model.name)
            )
            if exists:
                raise AlreadyExists("model", model.name)
            await c.execute(
                db.models.insert().values(
                    name=model.name,
                    description=model.description,
                    latest_version=0,
                    create_time=now,
                    update_time=now,
                )
            )
            await self._put_tags(c, db.model_tags, {"model": model.name}, tags)
            return await self._get_model(c, model.name)

    async def get_model(self, name: str) -> pb.Model:
        check_name("name", name)
        async with self.db.read() as c:
            return await self._get_model(c, name)

    async def list_models(
        self, size: int, token: str, name_prefix: str, tags: dict[str, str]
    ) -> tuple[list[pb.Model], str]:
        size = page_size(size)
        query = {"prefix": name_prefix, "tags": tags}
        after = decode_page_token(token, query)
        stmt = sa.select(db.models.c.name).order_by(db.models.c.name).limit(size + 1)
        if name_prefix:
            stmt = stmt.where(db.models.c.name.startswith(name_prefix, autoescape=True))
        if after is not None:
            stmt = stmt.where(db.models.c.name > after)
        for key, value in tags.items():
            stmt = stmt.where(
                sa.exists().where(
                    db.model_tags.c.model == db.models.c.name,
                    db.model_tags.c.key == key,
                    db.model_tags.c.value == value,
                )
            )
        async with self.db.read() as c:
            names = list((await c.scalars(stmt)).all())
            items, last = await _fill_page(names, size, lambda name: self._get_model(c, name))
        return items, encode_page_token(last, query) if last is not None else ""

    async def update_model(self, model: pb.Model, paths: Sequence[str]) -> pb.Model:
        check_name("model.name", model.name)
        _check_mask(paths, {"description", "tags"})
        check_text("model.description", model.description, MAX_DESCRIPTION_CHARS)
        async with self._write() as c:
            await self._get_model(c, model.name)
            values: dict[str, Any] = {"update_time": _now()}
            if "description" in paths:
                values["description"] = model.description
            await c.execute(
                db.models.update().where(db.models.c.name == model.name).values(**values)
            )
            if "tags" in paths:
                tags = check_tags("model.tags", model.tags)
                await c.execute(db.model_tags.delete().where(db.model_tags.c.model == model.name))
                await self._put_tags(c, db.model_tags, {"model": model.name}, tags)
            return await self._get_model(c, model.name)

    async def model_exists(self, name: str) -> bool:
        async with self.db.read() as c:
            return bool(await c.scalar(sa.select(db.models.c.name).where(db.models.c.name == name)))

    # ---- versions -----------------------------------------------------------

    async def add_version(
        self, header: Any, artifact_path: str, create_model: bool
    ) -> pb.ModelVersion:
        """Records a verified artifact as the model's next version (atomically)."""
        async with self._write() as c:
            exists = await c.scalar(
                sa.select(db.models.c.name).where(db.models.c.name == header.model)
            )
            if not exists:
                if not create_model:
                    raise NotFound("model", header.model)
                await self.create_model(pb.Model(name=header.model), conn=c)
            number = await c.scalar(
                db.models.update()
                .where(db.models.c.name == header.model)
                .values(latest_version=db.models.c.latest_version + 1, update_time=_now())
                .returning(db.models.c.latest_version)
            )
            await c.execute(
                db.versions.insert().values(
                    model=header.model,
                    version=number,
                    description=header.description,
                    format=header.format,
                    sha256=header.sha256,
                    size_bytes=header.size_bytes,
                    artifact_path=artifact_path,
                    lineage=header.lineage.SerializeToString(),
                    create_time=_now(),
                )
            )
            await self._put_tags(
                c, db.version_tags, {"model": header.model, "version": number}, dict(header.tags)
            )
            return await self._get_version(c, header.model, number)

    async def get_version(self, model: str, version: int) -> pb.ModelVersion:
        check_name("model", model)
        if version < 1:
            raise InvalidArgument.field("version", "must be >= 1")
        async with self.db.read() as c:
            return await self._get_version(c, model, version)

    async def artifact_path(self, model: str, version: int) -> str:
        async with self.db.read() as c:
            path = await c.scalar(
                sa.select(db.versions.c.artifact_path).where(
                    db.versions.c.model == model, db.versions.c.version == version
                )
            )
        if path is None:
            raise NotFound("model version", f"{model}/{version}")
        return str(path)

    async def resolve(self, model: str, selector: str, value: Any) -> pb.ModelVersion:
        """Resolves a reference: selector is "version", "alias" or None (newest)."""
        check_name("reference.model", model)
        async with self.db.read() as c:
            if selector == "version":
                if value < 1:
                    raise InvalidArgument.field("reference.version", "must be >= 1")
                return await self._get_version(c, model, value)
            if selector == "alias":
                check_name("reference.alias", value, ALIAS_NAME)
                found = await self._find_version(c, model, alias=value)
                if found is None:
                    await self._get_model(c, model)
                    raise NotFound("alias", f"{model}@{value}")
                return found
            latest = await c.scalar(
                sa.select(db.models.c.latest_version).where(db.models.c.name == model)
            )
            if latest is None:
                raise NotFound("model", model)
            if latest == 0:
                raise FailedPrecondition(f"model {model!r} has no versions yet", model=model)
            return await self._get_version(c, model, latest)

    async def list_versions(
        self, model: str, size: int, token: str, tags: dict[str, str]
    ) -> tuple[list[pb.ModelVersion], str]:
        check_name("model", model)
        size = page_size(size)
        query = {"model": model, "tags": tags}
        after = decode_page_token(token, query)
        v = db.versions
        stmt = (
            sa.select(v.c.version)
            .where(v.c.model == model)
            .order_by(v.c.version.desc())
            .limit(size + 1)
        )
        if after is not None:
            stmt = stmt.where(v.c.version < int(after))
        for key, value in tags.items():
            stmt = stmt.where(
                sa.exists().where(
                    db.version_tags.c.model == v.c.model,
                    db.version_tags.c.version == v.c.version,
                    db.version_tags.c.key == key,
                    db.version_tags.c.value == value,
                )
            )
        async with self.db.read() as c:
            await self._get_model(c, model)
            numbers = list((await c.scalars(stmt)).all())
            items, last = await _fill_page(numbers, size, lambda n: self._get_version(c, model, n))
        return items, encode_page_token(last, query) if last is not None else ""

    async def update_version(
        self, version: pb.ModelVersion, paths: Sequence[str]
    ) -> pb.ModelVersion:
        check_name("model_version.model", version.model)
        _check_mask(paths, {"description", "tags"})
        check_text("model_version.description", version.description, MAX_DESCRIPTION_CHARS)
        async with self._write() as c:
            await self._get_version(c, version.model, version.version)
            where = (db.versions.c.model == version.model, db.versions.c.version == version.version)
            if "description" in paths:
                await c.execute(
                    db.versions.update().where(*where).values(description=version.description)
                )
            if "tags" in paths:
                tags = check_tags("model_version.tags", version.tags)
                await c.execute(
                    db.version_tags.delete().where(
                        db.version_tags.c.model == version.model,
                        db.version_tags.c.version == version.version,
                    )
                )
                await self._put_tags(
                    c, db.version_tags, {"model": version.model, "version": version.version}, tags
                )
            return await self._get_version(c, version.model, version.version)

    # ---- aliases ------------------------------------------------------------

    async def set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        reason: str,
        actor: str,
        expected_version: int | None,
    ) -> tuple[pb.Alias, pb.AliasEvent]:
        check_name("model", model)
        check_name("alias", alias, ALIAS_NAME)
        check_text("reason", reason, MAX_REASON_CHARS)
        if version < 1:
            raise InvalidArgument.field("version", "must be >= 1")
        async with self._write() as c:
            await self._get_version(c, model, version)
            current = await self._alias_version(c, model, alias)
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
                return await self._alias_row(c, model, alias), pb.AliasEvent()
            action = AliasAction.ACTION_CREATED if current is None else AliasAction.ACTION_MOVED
            return await self._move_alias(c, model, alias, current, version, action, reason, actor)

    async def get_alias(self, model: str, alias: str) -> pb.Alias:
        check_name("model", model)
        check_name("alias", alias, ALIAS_NAME)
        async with self.db.read() as c:
            row = (
                await c.execute(
                    sa.select(db.aliases).where(
                        db.aliases.c.model == model, db.aliases.c.alias == alias
                    )
                )
            ).first()
            if row is None:
                await self._get_model(c, model)
                raise NotFound("alias", f"{model}@{alias}")
        return _alias(row)

    async def list_aliases(self, model: str, size: int, token: str) -> tuple[list[pb.Alias], str]:
        check_name("model", model)
        size = page_size(size)
        query = {"model": model}
        after = decode_page_token(token, query)
        stmt = (
            sa.select(db.aliases)
            .where(db.aliases.c.model == model)
            .order_by(db.aliases.c.alias)
            .limit(size + 1)
        )
        if after is not None:
            stmt = stmt.where(db.aliases.c.alias > after)
        async with self.db.read() as c:
            await self._get_model(c, model)
            rows = list((await c.execute(stmt)).all())
        by_name = {r.alias: r for r in rows}

        async def load(name: str) -> pb.Alias:
            return _alias(by_name[name])

        items, last = await _fill_page([r.alias for r in rows], size, load)
        return items, encode_page_token(last, query) if last is not None else ""

    async def delete_alias(self, model: str, alias: str, reason: str, actor: str) -> pb.AliasEvent:
        check_name("model", model)
        check_name("alias", alias, ALIAS_NAME)
        check_text("reason", reason, MAX_REASON_CHARS)
        async with self._write() as c:
            current = await self._alias_version(c, model, alias)
            if current is None:
                await self._get_model(c, model)
                raise NotFound("alias", f"{model}@{alias}")
            await c.execute(
                db.aliases.delete().where(db.aliases.c.model == model, db.aliases.c.alias == alias)
            )
            event = pb.AliasEvent(
                model=model,
                alias=alias,
                action=AliasAction.ACTION_DELETED,
                from_version=current,
                to_version=0,
                actor=actor,
                reason=reason,
            )
            await self._append_event(c, model, "alias", alias, event)
        return event

    async def rollback_alias(
        self, model: str, alias: str, reason: str, actor: str
    ) -> tuple[pb.Alias, pb.AliasEvent]:
        """Moves the alias back to where its last change took it from."""
        check_name("model", model)
        check_name("alias", alias, ALIAS_NAME)
        check_text("reason", reason, MAX_REASON_CHARS)
        async with self._write() as c:
            current = await self._alias_version(c, model, alias)
            if current is None:
                await self._get_model(c, model)
                raise NotFound("alias", f"{model}@{alias}")
            bodies = await c.scalars(
                sa.select(db.events.c.body)
                .where(
                    db.events.c.model == model,
                    db.events.c.kind == "alias",
                    db.events.c.subject == alias,
                )
                .order_by(db.events.c.sequence.desc())
                .limit(100)
            )
            # The last real change: no-op moves (recorded before set_alias
            # stopped recording them) took the alias nowhere.
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
            await self._get_version(c, model, last.from_version)
            return await self._move_alias(
                c,
                model,
                alias,
                current,
                last.from_version,
                AliasAction.ACTION_ROLLED_BACK,
                reason,
                actor,
            )

    async def alias_history(
        self, model: str, alias: str, size: int, token: str
    ) -> tuple[list[pb.AliasEvent], str]:
        check_name("model", model)
        if alias:
            check_name("alias", alias, ALIAS_NAME)
        size = page_size(size)
        query = {"model": model, "alias": alias}
        after = decode_page_token(token, query)
        e = db.events
        stmt = (
            sa.select(e.c.sequence, e.c.body, e.c.create_time)
            .where(e.c.model == model, e.c.kind == "alias")
            .order_by(e.c.sequence)
            .limit(size + 1)
        )
        if alias:
            stmt = stmt.where(e.c.subject == alias)
        if after is not None:
            stmt = stmt.where(e.c.sequence > int(after))
        async with self.db.read() as c:
            await self._get_model(c, model)
            rows = list((await c.execute(stmt)).all())
        bodies = {r.sequence: r for r in rows}

        async def load(sequence: int) -> pb.AliasEvent:
            return _event(pb.AliasEvent, bodies[sequence])  # type: ignore[no-any-return]

        events, last = await _fill_page([r.sequence for r in rows], size, load)
        return events, encode_page_token(last, query) if last is not None else ""

    # ---- experiments --------------------------------------------------------

    async def create_experiment(self, experiment: pb.Experiment) -> pb.Experiment:
        check_name("experiment.name", experiment.name)
        check_name("experiment.model", experiment.model)
        async with self._write() as c:
            await self._get_model(c, experiment.model)
            if await c.scalar(
                sa.select(db.experiments.c.name).where(db.experiments.c.name == experiment.name)
            ):
                raise AlreadyExists("experiment", experiment.name)
            stored = pb.Experiment()
            stored.CopyFrom(experiment)
            stored.stickiness_key = stored.stickiness_key or "api_key"
            await self._check_experiment(c, stored)
            now = _ts(_now())
            stored.state = pb.EXPERIMENT_STATE_RUNNING
            stored.create_time.CopyFrom(now)
            stored.update_time.CopyFrom(now)
            await c.execute(
                db.experiments.insert().values(
                    name=stored.name,
                    model=stored.model,
                    state=stored.state,
                    body=stored.SerializeToString(),
                )
            )
            await self._append_event(
                c,
                stored.model,
                "experiment",
                stored.name,
                pb.ExperimentEvent(action=ExperimentAction.ACTION_CREATED, experiment=stored),
            )
        return stored

    async def get_experiment(self, name: str) -> pb.Experiment:
        check_name("name", name)
        async with self.db.read() as c:
            return await self._get_experiment(c, name)

    async def list_experiments(
        self, model: str, state: int, size: int, token: str
    ) -> tuple[list[pb.Experiment], str]:
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
        async with self.db.read() as c:
            rows = list((await c.execute(stmt)).all())
        by_name = {r.name: r for r in rows}

        async def load(name: str) -> pb.Experiment:
            return pb.Experiment.FromString(by_name[name].body)

        items, last = await _fill_page([r.name for r in rows], size, load)
        return items, encode_page_token(last, query) if last is not None else ""

    async def update_experiment(
        self, experiment: pb.Experiment, paths: Sequence[str]
    ) -> pb.Experiment:
        check_name("experiment.name", experiment.name)
        _check_mask(paths, {"arms", "shadow", "stickiness_key", "description"})
        async with self._write() as c:
            stored = await self._get_experiment(c, experiment.name)
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
            await self._check_experiment(c, stored)
            return await self._save_experiment(c, stored, ExperimentAction.ACTION_UPDATED)

    async def stop_experiment(self, name: str) -> pb.Experiment:
        check_name("name", name)
        async with self._write() as c:
            stored = await self._get_experiment(c, name)
            if stored.state == pb.EXPERIMENT_STATE_STOPPED:
                return stored
            stored.state = pb.EXPERIMENT_STATE_STOPPED
            return await self._save_experiment(c, stored, ExperimentAction.ACTION_STOPPED)

    # ---- events -------------------------------------------------------------

    async def watch(
        self, models: Iterable[str], after: int, poll_seconds: float
    ) -> AsyncIterator[tuple[int, str, bytes]]:
        """Yields (sequence, kind, body) after ``after``, then live, forever."""
        models = [check_name("models", m) for m in models]
        e = db.events
        while True:
            stmt = (
                sa.select(e.c.sequence, e.c.kind, e.c.body, e.c.create_time)
                .where(e.c.sequence > after)
                .order_by(e.c.sequence)
                .limit(500)
            )
            if models:
                stmt = stmt.where(e.c.model.in_(models))
            async with self.db.read() as c:
                rows = list((await c.execute(stmt)).all())
            for row in rows:
                after = row.sequence
                yield row.sequence, row.kind, row.body
            if not rows:
                async with self._event_signal:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._event_signal.wait(), poll_seconds)

    # ---- internals ----------------------------------------------------------

    def _maybe_write(self, conn: AsyncConnection | None) -> Any:
        if conn is not None:
            return _Borrowed(conn)
        return self._write()

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction; once it commits, watchers are woken."""
        async with self.db.write() as c:
            yield c
        async with self._event_signal:
            self._event_signal.notify_all()

    async def _get_model(self, c: AsyncConnection, name: str) -> pb.Model:
        row = (await c.execute(sa.select(db.models).where(db.models.c.name == name))).first()
        if row is None:
            raise NotFound("model", name)
        tags = await self._tags(c, db.model_tags, db.model_tags.c.model == name)
        return pb.Model(
            name=row.name,
            description=row.description,
            tags=tags,
            latest_version=row.latest_version,
            create_time=_ts(row.create_time),
            update_time=_ts(row.update_time),
        )

    async def _get_version(self, c: AsyncConnection, model: str, version: int) -> pb.ModelVersion:
        found = await self._find_version(c, model, version=version)
        if found is None:
            if not await c.scalar(sa.select(db.models.c.name).where(db.models.c.name == model)):
                raise NotFound("model", model)
            raise NotFound("model version", f"{model}/{version}")
        return found

    async def _find_version(
        self, c: AsyncConnection, model: str, version: int | None = None, alias: str | None = None
    ) -> pb.ModelVersion | None:
        """A version by number or by alias, in two prepared queries: its row,
        then its tags and aliases together."""
        if alias is not None:
            row = (await c.execute(_VERSION_BY_ALIAS, {"model": model, "alias": alias})).first()
        else:
            row = (
                await c.execute(_VERSION_BY_NUMBER, {"model": model, "version": version})
            ).first()
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
            create_time=_ts(row.create_time),
            aliases=sorted(aliases),
        )

    async def _get_experiment(self, c: AsyncConnection, name: str) -> pb.Experiment:
        body = await c.scalar(sa.select(db.experiments.c.body).where(db.experiments.c.name == name))
        if body is None:
            raise NotFound("experiment", name)
        return pb.Experiment.FromString(body)

    async def _check_experiment(self, c: AsyncConnection, experiment: pb.Experiment) -> None:
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
                FieldViolation(
                    "experiment.description", f"at most {MAX_DESCRIPTION_CHARS} characters"
                )
            )
        if experiment.HasField("shadow") and not 0 <= experiment.shadow.percent <= 100:
            violations.append(
                FieldViolation("experiment.shadow.percent", "must be between 0 and 100")
            )
        if violations:
            raise InvalidArgument("invalid experiment", violations, experiment=experiment.name)
        for version in {arm.version for arm in experiment.arms} | (
            {experiment.shadow.version} if experiment.HasField("shadow") else set()
        ):
            await self._get_version(c, experiment.model, version)

    async def _save_experiment(
        self, c: AsyncConnection, stored: pb.Experiment, action: pb.ExperimentEvent.Action
    ) -> pb.Experiment:
        stored.update_time.CopyFrom(_ts(_now()))
        await c.execute(
            db.experiments.update()
            .where(db.experiments.c.name == stored.name)
            .values(state=stored.state, body=stored.SerializeToString())
        )
        await self._append_event(
            c,
            stored.model,
            "experiment",
            stored.name,
            pb.ExperimentEvent(action=action, experiment=stored),
        )
        return stored

    async def _alias_version(self, c: AsyncConnection, model: str, alias: str) -> int | None:
        value = await c.scalar(
            sa.select(db.aliases.c.version).where(
                db.aliases.c.model == model, db.aliases.c.alias == alias
            )
        )
        return None if value is None else int(value)

    async def _alias_row(self, c: AsyncConnection, model: str, alias: str) -> pb.Alias:
        row = (
            await c.execute(
                sa.select(db.aliases).where(
                    db.aliases.c.model == model, db.aliases.c.alias == alias
                )
            )
        ).first()
        if row is None:
            raise NotFound("alias", f"{model}@{alias}")
        return _alias(row)

    async def _move_alias(
        self,
        c: AsyncConnection,
        model: str,
        alias: str,
        current: int | None,
        version: int,
        action: pb.AliasEvent.Action,
        reason: str,
        actor: str,
    ) -> tuple[pb.Alias, pb.AliasEvent]:
        now = _now()
        if current is None:
            await c.execute(
                db.aliases.insert().values(
                    model=model, alias=alias, version=version, update_time=now
                )
            )
        else:
            await c.execute(
                db.aliases.update()
                .where(db.aliases.c.model == model, db.aliases.c.alias == alias)
                .values(version=version, update_time=now)
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
        await self._append_event(c, model, "alias", alias, event)
        return pb.Alias(model=model, alias=alias, version=version, update_time=_ts(now)), event

    async def _append_event(
        self, c: AsyncConnection, model: str, kind: str, subject: str, event: Any
    ) -> None:
        now = _now()
        event.create_time.CopyFrom(_ts(now))
        sequence = await c.scalar(
            db.events.insert()
            .values(model=model, kind=kind, subject=subject, body=b"", create_time=now)
            .returning(db.events.c.sequence)
        )
        event.sequence = sequence
        await c.execute(
            db.events.update()
            .where(db.events.c.sequence == sequence)
            .values(body=event.SerializeToString())
        )

    @staticmethod
    async def _tags(c: AsyncConnection, table: sa.Table, *where: Any) -> dict[str, str]:
        rows = await c.execute(sa.select(table.c.key, table.c.value).where(*where))
        return {row.key: row.value for row in rows}

    @staticmethod
    async def _put_tags(
        c: AsyncConnection, table: sa.Table, keys: dict[str, Any], tags: dict[str, str]
    ) -> None:
        if tags:
            await c.execute(
                table.insert(), [{**keys, "key": k, "value": v} for k, v in tags.items()]
            )


class _Borrowed:
    """An already-open transaction used as a context manager (no commit)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def __aenter__(self) -> AsyncConnection:
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        return None


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


async def _fill_page(
    keys: Sequence[Any], size: int, load: Callable[[Any], Awaitable[Any]]
) -> tuple[list[Any], Any | None]:
    """Loads the items of ``keys`` (up to ``size + 1`` of them, in list order)
    into a page of at most ``size`` items and MAX_PAGE_BYTES serialized (one
    item at least). Returns the page and the key to continue after (None: the
    list ends here)."""
    items: list[Any] = []
    total = 0
    last: Any = None
    for key in keys[:size]:
        item = await load(key)
        item_bytes = item.ByteSize() + 6  # plus its field tag and length prefix
        if items and total + item_bytes > MAX_PAGE_BYTES:
            return items, last
        items.append(item)
        total += item_bytes
        last = key
    return items, (keys[size - 1] if len(keys) > size else None)


def _check_mask(paths: Sequence[str], allowed: set[str]) -> None:
    if not paths:
        raise InvalidArgument.field("update_mask", f"name at least one of {sorted(allowed)}")
    unknown = [p for p in paths if p not in allowed]
    if unknown:
        raise InvalidArgument.field(
            "update_mask", f"cannot update {unknown}; allowed: {sorted(allowed)}"
        )


def _alias(row: Any) -> pb.Alias:
    return pb.Alias(
        model=row.model, alias=row.alias, version=row.version, update_time=_ts(row.update_time)
    )


def _event(cls: Any, row: Any) -> Any:
    return cls.FromString(row.body)

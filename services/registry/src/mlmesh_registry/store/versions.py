"""Versions: a model's numbered, immutable artifacts (1, 2, 3, ...), their
tags and description (the only parts that change), and references to them.
The fields' rules are the contract's, checked by the chassis."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh_chassis.errors import FailedPrecondition, NotFound
from mlmesh_chassis.pagination import decode_page_token

from mlmesh_registry import db
from mlmesh_registry.store.base import (
    StoreBase,
    check_mask,
    find_version,
    load_model,
    load_version,
    now,
    page,
    put_tags,
    replace_tags,
    tagged,
)
from mlmesh_registry.store.models import insert_model
from mlmesh_registry.validation import page_size


class VersionStore(StoreBase):
    async def add(self, header: rpc.UploadHeader, artifact_path: str) -> pb.ModelVersion:
        """Records a verified artifact as the model's next version, creating
        the model first where the header asks for it (one transaction). The
        header was checked before its upload began (the contract's rules by
        the chassis, the limits by the upload session)."""
        async with self.write() as c:
            number = await c.scalar(
                db.models.update()
                .where(db.models.c.name == header.model)
                .values(latest_version=db.models.c.latest_version + 1, update_time=now())
                .returning(db.models.c.latest_version)
            )
            if number is None:  # no such model (the increment is the existence check)
                if not header.create_model:
                    raise NotFound("model", header.model)
                number = 1
                await insert_model(c, header.model, latest_version=number)
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
                    create_time=now(),
                )
            )
            owner = {"model": header.model, "version": number}
            await put_tags(c, db.version_tags, owner, header.tags)
            return await load_version(c, header.model, number)

    async def get(self, model: str, version: int) -> pb.ModelVersion:
        async with self.read() as c:
            return await load_version(c, model, version)

    async def artifact_path(self, model: str, version: int) -> str:
        async with self.read() as c:
            path = await c.scalar(
                sa.select(db.versions.c.artifact_path).where(
                    db.versions.c.model == model, db.versions.c.version == version
                )
            )
        if path is None:
            raise NotFound("model version", f"{model}/{version}")
        return str(path)

    async def resolve(self, reference: ModelReference) -> pb.ModelVersion:
        """The version a reference names: by number, by alias, or the newest."""
        model, alias = reference.model, reference.alias
        selector = reference.WhichOneof("selector")
        async with self.read() as c:
            if selector == "version":
                return await load_version(c, model, reference.version)
            if selector == "alias":
                found = await find_version(c, model, alias=alias)
                if found is None:
                    await load_model(c, model)
                    raise NotFound("alias", f"{model}@{alias}")
                return found
            latest = await c.scalar(
                sa.select(db.models.c.latest_version).where(db.models.c.name == model)
            )
            if latest is None:
                raise NotFound("model", model)
            if latest == 0:
                raise FailedPrecondition(f"model {model!r} has no versions yet", model=model)
            return await load_version(c, model, latest)

    async def list_page(
        self, model: str, size: int, token: str, tags: Mapping[str, str]
    ) -> tuple[list[pb.ModelVersion], str]:
        tags = dict(tags)
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
        stmt = tagged(stmt, db.version_tags, {"model": v.c.model, "version": v.c.version}, tags)
        async with self.read() as c:
            await load_model(c, model)
            numbers = list((await c.scalars(stmt)).all())
            return await page(numbers, size, lambda n: load_version(c, model, n), query)

    async def update(self, version: pb.ModelVersion, paths: Sequence[str]) -> pb.ModelVersion:
        """Sets the fields ``paths`` names. The request's partial version is
        checked whole by the chassis (its unset fields break no rule), so the
        updated version keeps the rules."""
        check_mask(paths, {"description", "tags"})
        async with self.write() as c:
            await load_version(c, version.model, version.version)
            if "description" in paths:
                await c.execute(
                    db.versions.update()
                    .where(db.versions.c.model == version.model)
                    .where(db.versions.c.version == version.version)
                    .values(description=version.description)
                )
            if "tags" in paths:
                owner = {"model": version.model, "version": version.version}
                await replace_tags(c, db.version_tags, owner, version.tags)
            return await load_version(c, version.model, version.version)

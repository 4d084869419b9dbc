"""API keys: created, rotated and revoked here, by the gateway alone.

Every service verifies keys itself from a replica (``mlmesh_chassis.auth``),
fed by ``KeyDirectory``; this store is what that replica copies.

A secret looks like ``mlm_<16 hex id>_<32 url-safe characters>``: 192 random
bits, so the store keeps a plain SHA-256 of it (safe to replicate; nothing
like a pepper has to be shared with the services that verify it). Every
write gives the key the next revision (writes are serialized by the
database), so replicas read just what changed since the revision they hold.
A rotation keeps each earlier secret working until its own grace period
ends: rotating twice never cuts the first secret's promised grace short.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import re
import secrets
from typing import Any

import sqlalchemy as sa
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import key_directory_service_pb2 as kd
from mlmesh_chassis.auth import secret_sha256
from mlmesh_chassis.database import Database
from mlmesh_chassis.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
)

metadata = sa.MetaData()
keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("display_name", sa.String(255), nullable=False),
    # SHA-256 (hex) of the current secret.
    sa.Column("secret_hash", sa.String(64), nullable=False),
    # Secrets in their rotation grace: JSON [[sha256 hex, expire ISO time], ...].
    sa.Column("grace_secrets", sa.Text, nullable=True),
    sa.Column("body", sa.LargeBinary, nullable=False),  # serialized Key (no secret)
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    # The key directory reads what changed since a revision.
    sa.Index("ix_api_keys_revision", "revision"),
)
DEFAULT_SERVICES = (
    pb.PLATFORM_SERVICE_GENERATE,
    pb.PLATFORM_SERVICE_INFER,
    pb.PLATFORM_SERVICE_EMBED,
)
# Secrets of one key in their grace period at once (rotations in a row).
MAX_GRACE_SECRETS = 8
KEY_ID_LENGTH = 16
KEY_ID = re.compile(r"[0-9a-f]{16}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_secret(key_id: str) -> str:
    return f"mlm_{key_id}_{secrets.token_urlsafe(24)}"


class KeyStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # ---- administration ----------------------------------------------------

    async def create(self, key: pb.Key) -> tuple[pb.Key, str]:
        key_id = secrets.token_hex(KEY_ID_LENGTH // 2)
        secret = new_secret(key_id)
        stored = pb.Key()
        stored.CopyFrom(key)
        stored.id = key_id
        stored.state = pb.KEY_STATE_ACTIVE
        stored.secret_prefix = f"mlm_{key_id}"
        stored.create_time.FromDatetime(_now())
        stored.ClearField("revoke_time")
        stored.ClearField("previous_secret_expire_time")
        if not stored.scopes.services:
            stored.scopes.services.extend(DEFAULT_SERVICES)
        async with self.db.write() as c:
            await self._insert(c, stored, secret_sha256(secret))
        return stored, secret

    async def ensure(self, entry: kd.DirectoryKey) -> bool:
        """Inserts a bootstrap key (an operator's service or admin key, by its
        id and secret hash) unless a key with that id exists. An existing one
        takes the bootstrap scopes (a service that needs a new scope gets it
        on the next start); its secret (it may have been rotated) and its
        state stay: a revoked one stays revoked. True when inserted."""
        if not KEY_ID.fullmatch(entry.key.id) or not SHA256_HEX.fullmatch(entry.secret_sha256):
            raise InvalidArgument.field("key", "a 16-hex-digit id and a SHA-256 hex digest")
        async with self.db.write() as c:
            row = (
                await c.execute(sa.select(keys_table).where(keys_table.c.id == entry.key.id))
            ).first()
            if row is not None:
                key = _key(row)
                if key.state == pb.KEY_STATE_ACTIVE and key.scopes != entry.key.scopes:
                    key.scopes.CopyFrom(entry.key.scopes)
                    await c.execute(
                        keys_table.update()
                        .where(keys_table.c.id == key.id)
                        .values(body=key.SerializeToString(), revision=await _next_revision(c))
                    )
                return False
            stored = pb.Key()
            stored.CopyFrom(entry.key)
            stored.state = pb.KEY_STATE_ACTIVE
            stored.secret_prefix = f"mlm_{entry.key.id}"
            stored.create_time.FromDatetime(_now())
            await self._insert(c, stored, entry.secret_sha256)
        return True

    async def _insert(self, c: Any, key: pb.Key, digest: str) -> None:
        await c.execute(
            keys_table.insert().values(
                id=key.id,
                display_name=key.display_name,
                secret_hash=digest,
                grace_secrets=None,
                body=key.SerializeToString(),
                state=key.state,
                create_time=_now(),
                revision=await _next_revision(c),
            )
        )

    async def get(self, key_id: str) -> pb.Key:
        async with self.db.read() as c:
            row = (await c.execute(sa.select(keys_table).where(keys_table.c.id == key_id))).first()
        if row is None:
            raise NotFound("key", key_id)
        return _key(row)

    async def list(self, state: int) -> list[pb.Key]:
        stmt = sa.select(keys_table).order_by(keys_table.c.create_time.desc(), keys_table.c.id)
        if state:
            stmt = stmt.where(keys_table.c.state == state)
        async with self.db.read() as c:
            return [_key(row) for row in (await c.execute(stmt)).all()]

    async def revoke(self, key_id: str, reason: str) -> pb.Key:
        async with self.db.write() as c:
            row = await _locked_row(c, key_id)
            key = _key(row)
            if key.state == pb.KEY_STATE_REVOKED:
                return key
            key.state = pb.KEY_STATE_REVOKED
            key.revoke_time.FromDatetime(_now())
            key.ClearField("previous_secret_expire_time")
            await c.execute(
                keys_table.update()
                .where(keys_table.c.id == key_id)
                .values(
                    state=key.state,
                    body=key.SerializeToString(),
                    grace_secrets=None,
                    revision=await _next_revision(c),
                )
            )
        return key

    async def rotate(self, key_id: str, grace: dt.timedelta) -> tuple[pb.Key, str]:
        """A new secret; the old one keeps working for ``grace`` (0 to 7 days:
        RotateKeyRequest's rule)."""
        secret = new_secret(key_id)
        async with self.db.write() as c:
            row = await _locked_row(c, key_id)
            key = _key(row)
            if key.state != pb.KEY_STATE_ACTIVE:
                raise FailedPrecondition(
                    f"key {key_id} is not active",
                    Reason.ERROR_REASON_API_KEY_NOT_ACTIVE,
                    key_id=key_id,
                )
            now = _now()
            graced = [(sha, until) for sha, until in _grace(row) if until > now]
            if grace > dt.timedelta(0):
                graced.append((row.secret_hash, now + grace))
                key.previous_secret_expire_time.FromDatetime(now + grace)
            else:
                key.ClearField("previous_secret_expire_time")
            if len(graced) > MAX_GRACE_SECRETS:
                raise FailedPrecondition(
                    f"key {key_id} already has {MAX_GRACE_SECRETS} secrets in their grace "
                    "period; rotate with a zero grace period or wait",
                    key_id=key_id,
                )
            await c.execute(
                keys_table.update()
                .where(keys_table.c.id == key_id)
                .values(
                    secret_hash=secret_sha256(secret),
                    grace_secrets=json.dumps([[sha, t.isoformat()] for sha, t in graced]),
                    body=key.SerializeToString(),
                    revision=await _next_revision(c),
                )
            )
        return key, secret

    # ---- what services replicate ---------------------------------------------

    async def changes_since(self, revision: int) -> tuple[builtins.list[kd.DirectoryKey], int]:
        """Keys written after ``revision`` (all of them from 0), and the
        newest revision among them (``revision`` when none)."""
        stmt = (
            sa.select(keys_table)
            .where(keys_table.c.revision > revision)
            .order_by(keys_table.c.revision)
        )
        async with self.db.read() as c:
            rows = (await c.execute(stmt)).all()
        entries = [_entry(row) for row in rows]
        return entries, max((e.revision for e in entries), default=revision)


async def _next_revision(c: Any) -> int:
    """The next revision, inside a write (writes are serialized)."""
    latest = (await c.execute(sa.select(sa.func.max(keys_table.c.revision)))).scalar()
    return int(latest or 0) + 1


async def _locked_row(c: Any, key_id: str) -> Any:
    row = (await c.execute(sa.select(keys_table).where(keys_table.c.id == key_id))).first()
    if row is None:
        raise NotFound("key", key_id)
    return row


def _grace(row: Any) -> list[tuple[str, dt.datetime]]:
    return [(sha, dt.datetime.fromisoformat(t)) for sha, t in json.loads(row.grace_secrets or "[]")]


def _key(row: Any) -> pb.Key:
    return pb.Key.FromString(row.body)


def _entry(row: Any) -> kd.DirectoryKey:
    entry = kd.DirectoryKey(key=_key(row), secret_sha256=row.secret_hash, revision=row.revision)
    for sha, until in _grace(row):
        grace = entry.grace_secrets.add(secret_sha256=sha)
        grace.expire_time.FromDatetime(until)
    return entry

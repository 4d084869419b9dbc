"""API keys: created, rotated and revoked centrally; stored only as keyed hashes.

A secret looks like ``mlm_<id>_<random>``. The store keeps
HMAC-SHA256(pepper, secret) and looks keys up by id, comparing hashes in
constant time. Rotation keeps the previous secret's hash valid until its
grace period ends. Checks are cached for ``cache_seconds`` (default 0.5 s), so
a revoked key stops working everywhere within that time plus one database read.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import hmac
import re
import secrets
import time
from typing import Any

import sqlalchemy as sa
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.database import Database
from mlmesh_chassis.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

metadata = sa.MetaData()
keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("display_name", sa.String(255), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("previous_secret_hash", sa.String(64), nullable=True),
    sa.Column("previous_secret_expire_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)
_SECRET = re.compile(r"^mlm_([0-9a-f]{16})_[A-Za-z0-9_-]{20,}$")
DEFAULT_SERVICES = (
    pb.PLATFORM_SERVICE_GENERATE,
    pb.PLATFORM_SERVICE_INFER,
    pb.PLATFORM_SERVICE_EMBED,
)
MAX_GRACE = dt.timedelta(days=7)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


class KeyStore:
    def __init__(self, database: Database, pepper: bytes, cache_seconds: float = 0.5) -> None:
        self.db = database
        self._pepper = pepper
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, pb.Key | Exception]] = {}

    def hash(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    # ---- administration ----------------------------------------------------

    async def create(self, key: pb.Key, secret: str | None = None) -> tuple[pb.Key, str]:
        _check_key(key)
        key_id = secrets.token_hex(8)
        secret = secret or f"mlm_{key_id}_{secrets.token_urlsafe(24)}"
        match = _SECRET.match(secret)
        if match is None:
            raise InvalidArgument.field("secret", "not a well-formed mlmesh key")
        key_id = match.group(1)
        stored = pb.Key()
        stored.CopyFrom(key)
        stored.id = key_id
        stored.state = pb.KEY_STATE_ACTIVE
        stored.secret_prefix = f"mlm_{key_id}"
        stored.create_time.FromDatetime(_now())
        if not stored.scopes.services:
            stored.scopes.services.extend(DEFAULT_SERVICES)
        async with self.db.write() as c:
            await c.execute(
                keys_table.insert().values(
                    id=key_id,
                    display_name=stored.display_name,
                    secret_hash=self.hash(secret),
                    body=stored.SerializeToString(),
                    state=stored.state,
                    create_time=_now(),
                )
            )
        return stored, secret

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
            row = (await c.execute(sa.select(keys_table).where(keys_table.c.id == key_id))).first()
            if row is None:
                raise NotFound("key", key_id)
            key = _key(row)
            if key.state == pb.KEY_STATE_REVOKED:
                return key
            key.state = pb.KEY_STATE_REVOKED
            key.revoke_time.FromDatetime(_now())
            await c.execute(
                keys_table.update()
                .where(keys_table.c.id == key_id)
                .values(state=key.state, body=key.SerializeToString(), previous_secret_hash=None)
            )
        self._cache.clear()
        return key

    async def rotate(self, key_id: str, grace: dt.timedelta) -> tuple[pb.Key, str]:
        if grace < dt.timedelta(0) or grace > MAX_GRACE:
            raise InvalidArgument.field("grace_period", "between 0 and 7 days")
        secret = f"mlm_{key_id}_{secrets.token_urlsafe(24)}"
        async with self.db.write() as c:
            row = (await c.execute(sa.select(keys_table).where(keys_table.c.id == key_id))).first()
            if row is None:
                raise NotFound("key", key_id)
            key = _key(row)
            if key.state != pb.KEY_STATE_ACTIVE:
                raise FailedPrecondition(f"key {key_id} is not active", key_id=key_id)
            expires = _now() + grace
            key.previous_secret_expire_time.FromDatetime(expires)
            await c.execute(
                keys_table.update()
                .where(keys_table.c.id == key_id)
                .values(
                    secret_hash=self.hash(secret),
                    previous_secret_hash=row.secret_hash,
                    previous_secret_expire_time=expires,
                    body=key.SerializeToString(),
                )
            )
        self._cache.clear()
        return key, secret

    # ---- checks ---------------------------------------------------------------

    async def authenticate_call(self, context: Any) -> pb.Key:
        """The key in a gRPC call's `authorization: Bearer` metadata."""
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        return await self.authenticate(bearer(str(header)))

    async def authenticate(self, secret: str) -> pb.Key:
        """The active key ``secret`` belongs to; Unauthenticated otherwise."""
        if not secret:
            raise Unauthenticated("no API key: send `authorization: Bearer <key>`")
        digest = self.hash(secret)
        cached = self._cache.get(digest)
        if cached and time.monotonic() - cached[0] < self.cache_seconds:
            if isinstance(cached[1], Exception):
                raise cached[1]
            return cached[1]
        try:
            key = await self._authenticate(secret, digest)
        except Unauthenticated as error:
            self._cache[digest] = (time.monotonic(), error)
            raise
        self._cache[digest] = (time.monotonic(), key)
        return key

    async def _authenticate(self, secret: str, digest: str) -> pb.Key:
        match = _SECRET.match(secret)
        if match is None:
            raise Unauthenticated("malformed API key")
        async with self.db.read() as c:
            row = (
                await c.execute(sa.select(keys_table).where(keys_table.c.id == match.group(1)))
            ).first()
        if row is None:
            raise Unauthenticated("unknown API key")
        current = hmac.compare_digest(digest, row.secret_hash)
        previous = (
            row.previous_secret_hash is not None
            and hmac.compare_digest(digest, row.previous_secret_hash)
            and row.previous_secret_expire_time is not None
            and _now() < _aware(row.previous_secret_expire_time)
        )
        if not (current or previous):
            raise Unauthenticated("unknown API key")
        key = _key(row)
        if key.state == pb.KEY_STATE_REVOKED:
            raise Unauthenticated(f"API key {key.id} was revoked", key_id=key.id)
        if key.HasField("expire_time") and _now() >= key.expire_time.ToDatetime(dt.UTC):
            raise Unauthenticated(f"API key {key.id} expired", key_id=key.id)
        return key


def bearer(value: str) -> str:
    """The token of an `authorization: Bearer <token>` value ("" otherwise)."""
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def authorize(key: pb.Key, service: int | None, model: str | None = None) -> None:
    """PermissionDenied unless ``key`` may call ``service`` (None: any valid
    key may) and, when given, ``model``."""
    services = set(key.scopes.services)
    if pb.PLATFORM_SERVICE_ADMIN in services:
        return
    if service is not None and service not in services:
        name = pb.PlatformService.Name(service).removeprefix("PLATFORM_SERVICE_")
        raise PermissionDenied(f"key {key.id} has no {name} scope", key_id=key.id, service=name)
    patterns = list(key.scopes.model_patterns)
    if model is not None and patterns and not any(fnmatch.fnmatchcase(model, p) for p in patterns):
        raise PermissionDenied(
            f"key {key.id} may not use model {model}", key_id=key.id, model=model
        )


def _key(row: Any) -> pb.Key:
    return pb.Key.FromString(row.body)


def _check_key(key: pb.Key) -> None:
    violations = []
    if not 1 <= len(key.display_name) <= 255:
        violations.append(FieldViolation("key.display_name", "1 to 255 characters"))
    for i, pattern in enumerate(key.scopes.model_patterns):
        if not 1 <= len(pattern) <= 128:
            violations.append(
                FieldViolation(f"key.scopes.model_patterns[{i}]", "1 to 128 characters")
            )
    for i, service in enumerate(key.scopes.services):
        if service == pb.PLATFORM_SERVICE_UNSPECIFIED or service not in pb.PlatformService.values():
            violations.append(FieldViolation(f"key.scopes.services[{i}]", "not a service"))
    limits = key.limits
    for name in (
        "token_quota",
        "requests_per_minute",
        "tokens_per_minute",
        "max_concurrent_streams",
    ):
        if getattr(limits, name) < 0:
            violations.append(FieldViolation(f"key.limits.{name}", "must not be negative"))
    if violations:
        raise InvalidArgument("invalid key", violations)

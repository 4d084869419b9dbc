"""Every call's caller, checked in process: zero trust by port.

No service trusts a header or a port. Each one holds ``KeyView``, a local
replica of the gateway's keys (id, SHA-256 of the secrets, state, scopes,
limits, rotation grace), kept current by ``KeyWatcher`` from the gateway's
``KeyDirectoryService.WatchKeys`` change stream, and checks every call
against it in the server interceptor (``CallerCheck``): no round trip, about
a microsecond of hashing. The verified key is the call's ``Principal``
(``current_principal()``): the one identity a service bills by and records
as the actor.

Secrets are ``mlm_<16 hex id>_<32 url-safe characters>``: 192 random bits,
so a plain SHA-256 is safe to store and to replicate (no pepper to share).

The view is current within milliseconds of a change, not at once: a key
created a moment ago may not have reached it. A call whose key id the view
does not hold catches up first (``KeyView.catch_up``): it waits for the
view's next changes (``UNKNOWN_KEY_WAIT_S``) before it is refused, so a key
works as soon as ``CreateKey`` returns; the gateway, which holds the store,
reads it instead.

Open streams are re-checked whenever the view changes and twice a second
(rotation grace and expiry are times): a stream whose key stops
authenticating is ended with UNAUTHENTICATED (``LiveCalls``).

A service calls its peers with its own key (``ServiceIdentity``), read from
a file that an operator may replace to rotate it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool, json_format
from google.protobuf.timestamp_pb2 import Timestamp
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import key_directory_service_pb2 as kd
from mlmesh.gateway.v1 import key_directory_service_pb2_grpc as kd_grpc

from mlmesh_chassis.channels import FAST_RECONNECT_OPTIONS
from mlmesh_chassis.errors import PermissionDenied, Reason, Unauthenticated, Unavailable
from mlmesh_chassis.registration import Route, registrations, route_table

log = logging.getLogger("mlmesh.auth")

SECRET_PATTERN = re.compile(r"mlm_([0-9a-f]{16})_[A-Za-z0-9_-]{20,64}")
MAX_SECRET_LENGTH = 90

# How long a call with a key id the view does not hold waits for the key to
# arrive (the gateway pushes a new key within milliseconds; longer on a
# loaded machine), and how many such calls wait at once: past that, an
# unknown key is refused at once, so a flood of made-up ids parks no more
# than this many calls.
UNKNOWN_KEY_WAIT_S = 1.0
MAX_UNKNOWN_KEY_WAITERS = 64

S = pb.PlatformService


def secret_sha256(secret: str) -> str:
    """How secrets are stored and replicated: lowercase hex SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer(value: str) -> str:
    """The token of an ``authorization: Bearer <token>`` value ("" otherwise)."""
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


# ---- the verified caller ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """The key a call was verified against."""

    key: pb.Key
    digest: str

    @property
    def key_id(self) -> str:
        return self.key.id

    @property
    def actor(self) -> str:
        """How histories and ledgers name who acted."""
        return f"key:{self.key.id}"


principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "principal", default=None
)


def current_principal() -> Principal:
    """The verified caller of the call being served (set by the interceptor)."""
    principal = principal_var.get()
    if principal is None:
        raise Unauthenticated("no verified caller for this call")
    return principal


def authorize(key: pb.Key, services: int | Iterable[int] | None, model: str | None = None) -> None:
    """PermissionDenied unless ``key`` holds ``services`` (one of them, when
    several; None or empty: any valid key may call) and, when given, may use
    ``model``. An ADMIN key may call everything."""
    held = set(key.scopes.services)
    if pb.PLATFORM_SERVICE_ADMIN in held:
        return
    wanted = {services} if isinstance(services, int) else set(services or ())
    if wanted and not wanted & held:
        name = "|".join(sorted(S.Name(s).removeprefix("PLATFORM_SERVICE_") for s in wanted))
        raise PermissionDenied(f"key {key.id} has no {name} scope", key_id=key.id, service=name)
    patterns = list(key.scopes.model_patterns)
    if model is not None and patterns and not any(fnmatch.fnmatchcase(model, p) for p in patterns):
        raise PermissionDenied(
            f"key {key.id} may not use model {model}", key_id=key.id, model=model
        )


# ---- which scope each RPC needs -------------------------------------------------

# Each service's registration (mlmesh_chassis.registration) states the scopes
# its RPCs need; the table is every installed service's routes, read on the
# first check. First match wins; a method that matches none is refused (deny
# by default).


def route_scopes() -> tuple[Route, ...]:
    """Every registered service's routes."""
    return route_table(registrations())


UNCHECKED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def _read_only(method: str) -> bool:
    """Whether the contract marks ``/pkg.Service/Method`` NO_SIDE_EFFECTS."""
    service, _, name = method.strip("/").partition("/")
    try:
        found = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    except KeyError:
        return False
    options = found.GetOptions()
    return bool(options.idempotency_level == options.NO_SIDE_EFFECTS)


def scopes_for(method: str, routes: Iterable[Route] | None = None) -> frozenset[int] | None:
    """The scopes any of which may call ``method`` (empty: any key); None
    when no route covers it (refused). ``routes``: default, every registered
    service's (``route_scopes()``)."""
    for prefix, write, read in route_scopes() if routes is None else routes:
        if method.startswith(prefix):
            return read if _read_only(method) else write
    return None


# ---- the replicated view ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key as a service verifies it."""

    key: pb.Key
    secret_sha256: str
    grace: tuple[tuple[str, float], ...]  # (sha256, expires at, epoch seconds)
    expires_at: float | None
    revision: int

    @classmethod
    def of(cls, entry: kd.DirectoryKey) -> KeyRecord:
        return cls(
            key=entry.key,
            secret_sha256=entry.secret_sha256,
            grace=tuple((g.secret_sha256, _epoch(g.expire_time)) for g in entry.grace_secrets),
            expires_at=(
                _epoch(entry.key.expire_time) if entry.key.HasField("expire_time") else None
            ),
            revision=entry.revision,
        )

    def refusal(self, digest: str, now: float) -> tuple[str, int] | None:
        """Why ``digest`` does not authenticate as this key now, and the
        ErrorReason that says so (None: it does)."""
        matches = hmac.compare_digest(digest, self.secret_sha256) or any(
            hmac.compare_digest(digest, sha) and now < until for sha, until in self.grace
        )
        if not matches:
            return "unknown API key", Reason.ERROR_REASON_API_KEY_INVALID
        if self.key.state == pb.KEY_STATE_REVOKED:
            return f"API key {self.key.id} was revoked", Reason.ERROR_REASON_API_KEY_REVOKED
        if self.key.state != pb.KEY_STATE_ACTIVE or (
            self.expires_at is not None and now >= self.expires_at
        ):
            return f"API key {self.key.id} expired", Reason.ERROR_REASON_API_KEY_EXPIRED
        return None


def _epoch(stamp: Timestamp) -> float:
    """Seconds since the epoch; a time no datetime can hold counts as already
    past (one bad key must never stop the view from loading)."""
    try:
        return stamp.ToDatetime(dt.UTC).timestamp()
    except (ValueError, OverflowError):
        return 0.0


class KeyView:
    """This process's replica of the keys. ``synced`` once a full snapshot
    from the gateway was applied; before that, only seeded bootstrap keys
    (the operator's service and admin keys) authenticate."""

    def __init__(self) -> None:
        self._keys: dict[str, KeyRecord] = {}
        self.synced = False
        self.revision = 0
        self._listeners: list[Callable[[], None]] = []
        # Set (and replaced) on every change, for calls waiting on a key.
        self._change = asyncio.Event()
        self._waiting = 0
        # How the view catches up on an unknown key id before the call is
        # refused: by default it waits for the key to arrive (wait_for_key);
        # the gateway reads its own store instead (keys another replica
        # created a moment ago).
        self.catch_up: Callable[[str], Awaitable[None]] = self.wait_for_key

    def __len__(self) -> int:
        return len(self._keys)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()
        changed, self._change = self._change, asyncio.Event()
        changed.set()

    async def wait_for_key(self, key_id: str) -> None:
        """Returns once the view holds ``key_id``, or after UNKNOWN_KEY_WAIT_S
        (at once when MAX_UNKNOWN_KEY_WAITERS calls wait already)."""
        if key_id in self._keys or self._waiting >= MAX_UNKNOWN_KEY_WAITERS:
            return
        self._waiting += 1
        try:
            async with asyncio.timeout(UNKNOWN_KEY_WAIT_S):
                while key_id not in self._keys:
                    await self._change.wait()
        except TimeoutError:
            pass
        finally:
            self._waiting -= 1

    def seed(self, entries: Iterable[kd.DirectoryKey]) -> None:
        """Bootstrap keys, trusted only until the first snapshot."""
        if not self.synced:
            self._keys.update({e.key.id: KeyRecord.of(e) for e in entries})

    def replace(self, entries: Iterable[kd.DirectoryKey], revision: int) -> None:
        """A full snapshot: the view becomes these keys. A snapshot older than
        the view (a lagging gateway replica) keeps the newer records held."""
        fresh = {e.key.id: KeyRecord.of(e) for e in entries}
        if revision < self.revision:
            for key_id, held in self._keys.items():
                if held.revision > revision and (
                    key_id not in fresh or held.revision > fresh[key_id].revision
                ):
                    fresh[key_id] = held
        self._keys = fresh
        self.revision = max(revision, self.revision)
        self.synced = True
        self._changed()

    def apply(self, entries: Iterable[kd.DirectoryKey], revision: int) -> None:
        """Changed keys, newer than what the view holds."""
        for entry in entries:
            held = self._keys.get(entry.key.id)
            if held is None or held.revision <= entry.revision:
                self._keys[entry.key.id] = KeyRecord.of(entry)
        self.revision = max(self.revision, revision)
        self._changed()

    def get(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    def verify(self, secret: str) -> Principal:
        """The key ``secret`` authenticates as; Unauthenticated otherwise
        (Unavailable while the view has not been loaded yet)."""
        if not secret:
            raise Unauthenticated(
                "no API key: send `authorization: Bearer <key>`",
                Reason.ERROR_REASON_API_KEY_MISSING,
            )
        match = SECRET_PATTERN.fullmatch(secret) if len(secret) <= MAX_SECRET_LENGTH else None
        if match is None:
            raise Unauthenticated("malformed API key", Reason.ERROR_REASON_API_KEY_INVALID)
        digest = secret_sha256(secret)
        return self.verify_digest(match.group(1), digest)

    def verify_digest(self, key_id: str, digest: str) -> Principal:
        record = self._keys.get(key_id)
        if record is None:
            if not self.synced:
                raise Unavailable(
                    "this service has not loaded the key directory yet", retry_after_s=1.0
                )
            raise UnknownKey(key_id)
        refusal = record.refusal(digest, time.time())
        if refusal is not None:
            message, reason = refusal
            raise Unauthenticated(message, reason, key_id=key_id)
        return Principal(record.key, digest)


class UnknownKey(Unauthenticated):
    """A well-formed key whose id the view does not hold."""

    def __init__(self, key_id: str) -> None:
        super().__init__("unknown API key", Reason.ERROR_REASON_API_KEY_INVALID)
        self.key_id = key_id


def read_bootstrap_keys(path: Path) -> list[kd.DirectoryKey]:
    """Bootstrap keys (a WatchKeysResponse in JSON, written by the operator)."""
    message = json_format.Parse(path.read_text(), kd.WatchKeysResponse())
    return list(message.keys)


# ---- open streams ----------------------------------------------------------------


# How long a stream whose key stopped authenticating may take to notice by
# itself (the interceptor checks after every message it sends) before its
# task is cancelled (a stream that sends nothing: a watch, an upload).
CANCEL_AFTER_S = 0.2


@dataclass(eq=False)
class LiveCall:
    """An open stream and the key it was verified against."""

    principal: Principal
    task: asyncio.Task[object] | None
    ended_because: str | None = None
    done: bool = False

    def end(self, reason: str) -> None:
        if self.ended_because is None:
            self.ended_because = reason
            if self.task is not None:
                asyncio.get_running_loop().call_later(CANCEL_AFTER_S, self._cancel)

    def _cancel(self) -> None:
        # Not while it is busy sending: a busy stream ends at its next message.
        if not self.done and self.task is not None:
            self.task.cancel()


class LiveCalls:
    """Open streams, ended when their key stops authenticating."""

    def __init__(self, view: KeyView, sweep_seconds: float = 0.5) -> None:
        self.view = view
        self.sweep_seconds = sweep_seconds
        self._calls: set[LiveCall] = set()
        self._sweeper: asyncio.Task[None] | None = None
        view.on_change(self.sweep)

    def add(self, principal: Principal) -> LiveCall:
        call = LiveCall(principal, asyncio.current_task())
        self._calls.add(call)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        return call

    def discard(self, call: LiveCall) -> None:
        self._calls.discard(call)

    def sweep(self) -> None:
        for call in list(self._calls):
            try:
                self.view.verify_digest(call.principal.key_id, call.principal.digest)
            except Unauthenticated as refused:
                log.info(
                    "ending an open stream: %s",
                    refused.message,
                    extra={"key_id": call.principal.key_id},
                )
                call.end(refused.message)
                self._calls.discard(call)
            except Unavailable:
                pass  # the view is not loaded yet: nothing to judge by

    async def _sweep_forever(self) -> None:
        while self._calls:
            await asyncio.sleep(self.sweep_seconds)
            self.sweep()


# ---- the server side: one check per call -------------------------------------------

# What a service does with each verified call before its handler runs (e.g.
# per-key request limits and a usage event: mlmesh_metering.call_admission):
# a context manager entered around the whole call, given the caller and the
# method.
CallAdmission = Callable[[Principal, str], contextlib.AbstractAsyncContextManager[object]]


class CallerCheck:
    """What the server interceptor asks of every call: which scopes the
    method needs, and whether the caller's key holds one."""

    def __init__(self, view: KeyView, admission: CallAdmission | None = None) -> None:
        self.view = view
        self.live = LiveCalls(view)
        self.admission = admission
        self._scopes: dict[str, frozenset[int] | None] = {}

    async def check(self, method: str, context: grpc.aio.ServicerContext) -> Principal:
        try:
            scopes = self._scopes[method]
        except KeyError:
            scopes = self._scopes[method] = scopes_for(method)
        secret = ""
        for name, value in context.invocation_metadata() or ():
            if name == "authorization" and isinstance(value, str):
                secret = bearer(value)
                break
        try:
            principal = self.view.verify(secret)
        except UnknownKey as unknown:
            await self.view.catch_up(unknown.key_id)
            principal = self.view.verify(secret)
        if scopes is None:
            raise PermissionDenied("no access policy covers this method", method=method[:120])
        authorize(principal.key, scopes)
        return principal


# ---- keeping the view current -----------------------------------------------------


class KeyWatcher:
    """Follows KeyDirectoryService.WatchKeys into a KeyView: a full snapshot
    on every (re)connect, then changes; reconnects with backoff."""

    def __init__(
        self,
        view: KeyView,
        target: Callable[[], str | None],
        identity: ServiceIdentity,
        heartbeat_timeout_s: float = 15.0,
        on_connected: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.view = view
        self.target = target
        self.identity = identity
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.connected = asyncio.Event()
        # Told when the view becomes current (True) and when the stream is lost.
        self.on_connected = on_connected

    async def run(self) -> None:
        # Retries stay frequent (at most 0.5 s apart, on a local connection):
        # a gateway that comes back must reach every service within a second.
        backoff = 0.05
        failing_since: float | None = None
        while True:
            target = self.target()
            try:
                if target:
                    await self._follow(target)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "key directory at %s unreachable (%s); serving from the view held",
                        target,
                        type(error).__name__,
                    )
            else:
                failing_since = None
            if self.connected.is_set():
                backoff = 0.05
                self.connected.clear()
                if self.on_connected is not None:
                    await self.on_connected(False)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)

    async def _follow(self, target: str) -> None:
        async with grpc.aio.insecure_channel(target, options=FAST_RECONNECT_OPTIONS) as channel:
            stub = kd_grpc.KeyDirectoryServiceStub(channel)
            call = stub.WatchKeys(
                kd.WatchKeysRequest(),
                metadata=(("authorization", f"Bearer {self.identity.secret()}"),),
            )
            snapshot: list[kd.DirectoryKey] = []
            stream = aiter(call)
            while True:
                message = await asyncio.wait_for(anext(stream), self.heartbeat_timeout_s)
                if message.snapshot:
                    snapshot.extend(message.keys)
                    if message.snapshot_complete:
                        self.view.replace(snapshot, message.revision)
                        snapshot = []
                        self.connected.set()
                        if self.on_connected is not None:
                            await self.on_connected(True)
                        log.info(
                            "key directory loaded",
                            extra={"keys": len(self.view), "revision": message.revision},
                        )
                elif message.keys:
                    self.view.apply(message.keys, message.revision)


def peer_target(address: str, port_file: Path | None) -> Callable[[], str | None] | None:
    """Where a peer is, asked at each (re)connect: a fixed ``address``
    (host:port or unix:path), else the port in its chassis ``port_file``;
    None when neither is set."""
    if address:
        return lambda: address
    if port_file is not None:
        return port_file_target(port_file)
    return None


def port_file_target(path: Path, host: str = "127.0.0.1") -> Callable[[], str | None]:
    """A target read from a chassis port file each time (it follows restarts)."""

    def target() -> str | None:
        try:
            return f"{host}:{int(json.loads(path.read_text())['port'])}"
        except (OSError, ValueError, KeyError):
            return None

    return target


# ---- this service's own key ----------------------------------------------------------


@dataclass
class ServiceIdentity:
    """This process's own key, from a file (replace the file to rotate it:
    it is re-read when it changes)."""

    path: Path | None
    _secret: str = ""
    _mtime: float = -1.0
    _checked: float = field(default=0.0)

    def secret(self) -> str:
        if self.path is None:
            return ""
        now = time.monotonic()
        if now - self._checked >= 1.0 or not self._secret:
            self._checked = now
            try:
                mtime = os.stat(self.path).st_mtime
                if mtime != self._mtime:
                    self._secret, self._mtime = self.path.read_text().strip(), mtime
            except OSError:
                log.warning("service key file %s unreadable", self.path)
        return self._secret

    def metadata(self) -> tuple[tuple[str, str], ...]:
        secret = self.secret()
        return (("authorization", f"Bearer {secret}"),) if secret else ()


_identity = ServiceIdentity(None)


def set_service_identity(identity: ServiceIdentity) -> None:
    global _identity
    _identity = identity


def service_identity() -> ServiceIdentity:
    """The key this process calls its peers with (empty outside a service)."""
    return _identity

"""A lean Redis client for the throttle's two hot calls (admit, settle).

Every Generate pays one admit and one settle. Through redis-py's asyncio
client each cost about 0.1 ms of the gateway's CPU (its connection pool,
retry wrapper, command packing and reply parsing in Python): about a fifth
of the gateway's whole CPU per request on the OpenAI surface
(``bench/openai_gateway.py``). This client does only what those calls need,
with hiredis (C) packing commands and parsing replies:

- one connection, pipelined: concurrent calls are written as they come and
  their replies are matched in order (Redis answers a connection's commands
  in the order sent), so there is no pool to take from and give back;
- ``EVALSHA`` with the script loaded on ``NOSCRIPT`` (a restarted Redis);
- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) and
  ``unix:///path/to/socket[?db=N]``; ``AUTH`` and ``SELECT`` on connect;
- a call whose reply nobody needs before going on (the settle) can be
  written and its reply checked later (``post_evalsha``);
- every call bounded by ``timeout_s``, the connect included. A call that
  times out closes the connection (its reply could still come, and the
  replies after it would be read as the wrong calls' otherwise): the calls
  in flight on it fail with ``ConnectionError`` and the next call connects
  again. The throttle treats both as Redis being unreachable (its outage
  policy).

Error replies raise ``RespError`` with Redis' message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import ssl
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

DEFAULT_PORT = 6379
log = logging.getLogger("mlmesh.metering.resp")


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""


class _Protocol(asyncio.Protocol):
    """One connection: requests written in order, replies matched in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.scripts: set[str] = set()  # SHA1s this connection has run

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as error:
                self.abort(ConnectionError(f"Redis protocol error: {error}"))
                return
            if reply is False:
                return
            if not self.waiting:  # a reply nobody asked for: the stream is off
                self.abort(ConnectionError("Redis sent a reply no call was waiting for"))
                return
            future = self.waiting.popleft()
            if not future.done():  # done: its caller gave up (timeout, cancel)
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"Redis connection lost: {exc or 'closed'}"))

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if self.closed or self.transport is None:
            raise ConnectionError("Redis connection closed")
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(packed)
        return future

    def abort(self, error: Exception) -> None:
        self._fail(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: Exception) -> None:
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class Script:
    """A Lua script called by its SHA1 (``EVALSHA``), loaded when Redis lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def command(self, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


def _value(reply: Any) -> Any:
    """The reply, or ``RespError`` for an error reply."""
    if isinstance(reply, hiredis.ReplyError):
        raise RespError(str(reply))
    return reply


def _tls(query: dict[str, list[str]]) -> ssl.SSLContext:
    """The TLS context of a rediss:// URL, with redis-py's query options:
    ``ssl_ca_certs`` (a CA bundle file), ``ssl_cert_reqs`` (required,
    optional or none) and ``ssl_check_hostname``."""
    context = ssl.create_default_context(cafile=query.get("ssl_ca_certs", [None])[0])
    check = query.get("ssl_check_hostname", ["true"])[0].lower()
    if check not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError("ssl_check_hostname in a Redis URL is true or false")
    context.check_hostname = check in ("true", "1", "yes")
    requirement = query.get("ssl_cert_reqs", ["required"])[0].lower()
    modes = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
    if requirement not in modes:
        raise ValueError("ssl_cert_reqs in a Redis URL is required, optional or none")
    if modes[requirement] is ssl.CERT_NONE:
        context.check_hostname = False
    context.verify_mode = modes[requirement]
    return context


class RespClient:
    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "a Redis URL is redis://host[:port][/db], rediss://... or unix:///path"
            )
        query = parse_qs(parts.query)
        self.socket = parts.path if parts.scheme == "unix" else ""
        self.host = parts.hostname or "localhost"
        self.port = parts.port or DEFAULT_PORT
        self.username = unquote(parts.username) if parts.username else ""
        self.password = unquote(parts.password) if parts.password else ""
        self.password = self.password or query.get("password", [""])[0]
        # The database: the path (redis://host/3), or ?db=3 (which wins, as
        # in redis-py; the only way for unix sockets).
        db = query.get("db", [""])[0] or ("" if self.socket else parts.path.strip("/"))
        if db and not db.isdigit():
            raise ValueError("the Redis database in the URL is a number (redis://host:port/0)")
        self.db = int(db) if db else 0
        self.ssl = _tls(query) if parts.scheme == "rediss" else None
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Lock | None = None
        self._posted: set[asyncio.Task[Any]] = set()  # re-runs of posted calls
        self._closed = False

    async def execute(self, *args: Any) -> Any:
        """One command; its reply (bytes, int, list...); ``RespError`` for an error reply."""
        protocol = await self._connection()
        future = protocol.send(hiredis.pack_command(args))
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await future
        except TimeoutError:
            protocol.abort(ConnectionError("a Redis call timed out"))
            raise
        return _value(reply)

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            reply = await self.execute(*script.command(keys, args))
        except RespError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
            await self.execute("SCRIPT", "LOAD", script.source)
            reply = await self.execute(*script.command(keys, args))
        if self._protocol is not None:
            self._protocol.scripts.add(script.sha)
        return reply

    def post_evalsha(self, script: Script, keys: list[str], args: list[Any]) -> bool:
        """Writes an ``EVALSHA`` now and checks its reply later, without
        waiting for it: False when there is no open connection to write to
        or none that has run this script yet (the caller then awaits
        ``evalsha``). Later calls on this client are written after it on
        the same connection, so Redis runs them after it. A failed reply is
        logged; ``NOSCRIPT`` (the script cache flushed by hand meanwhile) or
        a lost connection runs the call again, once, in a task: only then
        can a later call run first. Only for scripts that may run twice."""
        protocol = self._protocol
        if (
            protocol is None
            or protocol.closed
            or script.sha not in protocol.scripts
            or self._loop is not asyncio.get_running_loop()
        ):
            return False
        future = protocol.send(hiredis.pack_command(script.command(keys, args)))

        def checked(done: asyncio.Future[Any]) -> None:
            if done.cancelled():
                return
            error = done.exception()
            reply = None if error is not None else done.result()
            noscript = isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")
            # Run again (once): the script was flushed meanwhile, or the
            # connection was lost, with the call's effect unknown (the
            # throttle's scripts can run twice).
            if (noscript or isinstance(error, ConnectionError)) and not self._closed:
                task = asyncio.get_running_loop().create_task(self.evalsha(script, keys, args))
                self._posted.add(task)
                task.add_done_callback(self._posted_done)
            elif error is not None or isinstance(reply, hiredis.ReplyError):
                log.warning("a pipelined Redis call failed: %s", error or reply)

        future.add_done_callback(checked)
        return True

    def _posted_done(self, task: asyncio.Task[Any]) -> None:
        self._posted.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a pipelined Redis call failed: %s", task.exception())

    async def close(self) -> None:
        """Waits (up to the timeout) for the replies still due, then closes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while loop.time() < deadline:
            protocol = self._protocol
            open_ = protocol is not None and not protocol.closed and self._loop is loop
            due = [f for f in protocol.waiting if not f.done()] if open_ and protocol else []
            due += list(self._posted)  # (a NOSCRIPT re-run starts when its reply comes)
            if not due:
                break
            await asyncio.wait(due, timeout=deadline - loop.time())
        self._closed = True
        protocol, self._protocol = self._protocol, None
        if protocol is not None and not protocol.closed and protocol.transport is not None:
            protocol.closed = True
            protocol.transport.close()

    async def _connection(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        protocol = self._protocol
        if protocol is not None and not protocol.closed and self._loop is loop:
            return protocol
        if self._closed:
            raise ConnectionError("the Redis client is closed")
        if self._loop is not loop or self._connecting is None:
            # First use, or a new event loop (tests): the old connection
            # belongs to the old loop.
            if protocol is not None and protocol.transport is not None:
                with contextlib.suppress(RuntimeError):  # its loop is closed
                    protocol.transport.abort()
            self._loop, self._protocol, self._connecting = loop, None, asyncio.Lock()
        # One bound for the wait and the connect: a call queued behind a
        # connect that hangs fails with it, not after it.
        async with asyncio.timeout(self.timeout_s), self._connecting:
            protocol = self._protocol
            if protocol is None or protocol.closed:
                protocol = await self._connect(loop)
                self._protocol = protocol
            return protocol

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        """A new connection, authenticated and on the URL's database."""
        if self.socket:
            _, protocol = await loop.create_unix_connection(_Protocol, self.socket)
        else:
            _, protocol = await loop.create_connection(
                _Protocol, self.host, self.port, ssl=self.ssl
            )
        try:
            if self.password:
                user = (self.username,) if self.username else ()
                await self._checked(protocol, ("AUTH", *user, self.password))
            if self.db:
                await self._checked(protocol, ("SELECT", self.db))
        except BaseException:
            protocol.abort(ConnectionError("Redis connection set-up failed"))
            raise
        return protocol

    @staticmethod
    async def _checked(protocol: _Protocol, args: tuple[Any, ...]) -> None:
        _value(await protocol.send(hiredis.pack_command(args)))

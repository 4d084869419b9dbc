"""Server and client interceptors: the cross-cutting work of every call.

The server side does, in one wrapper per call: the caller's key check
(``mlmesh_chassis.auth``: every RPC but health and reflection), request id
(from ``x-request-id`` or new), W3C trace context extraction and a server
span, the call's deadline into a contextvar, metrics, an access log line for
failures, and the single mapping of domain errors to google.rpc.Status.
Requests that do not decode (invalid protobuf bytes) get INVALID_ARGUMENT, and
so do those that break their contract's buf.validate rules
(``mlmesh_chassis.validation``), each message of a client stream included.

Each call runs in a task of its own, with its own copy of the context, so
the contextvars set here are never reset: a stream's generator may be
finalised from another context (a client that went away), where resetting
would fail.

The client side injects trace context and the request id, and shrinks each
outgoing call's timeout to what is left of the current call's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mlmesh_chassis import metrics
from mlmesh_chassis.auth import (
    CallerCheck,
    LiveCall,
    Principal,
    principal_var,
    service_identity,
)
from mlmesh_chassis.context import (
    REQUEST_ID_HEADER,
    deadline_var,
    new_request_id,
    remaining_time,
    request_id_var,
)
from mlmesh_chassis.errors import InvalidArgument, MlmeshError, Reason, Unauthenticated, to_status
from mlmesh_chassis.validation import check_async

log = logging.getLogger("mlmesh.rpc")
_tracer = trace.get_tracer("mlmesh.chassis")


class _CallScope:
    """Everything set up for one served call, and its teardown."""

    __slots__ = ("code", "live", "method", "principal", "service", "span", "start")

    def __init__(self, service: str, method: str, context: grpc.aio.ServicerContext) -> None:
        self.service = service
        self.method = method
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        request_id = carrier.get(REQUEST_ID_HEADER) or new_request_id()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        parent = propagate.extract(carrier)
        self.span = _tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": method.rsplit("/", 2)[-2],
                "rpc.method": method.rsplit("/", 1)[-1],
                "mlmesh.request_id": request_id,
            },
        )
        request_id_var.set(request_id)
        deadline_var.set(deadline)
        trace.context_api.attach(trace.set_span_in_context(self.span))
        self.live: LiveCall | None = None
        self.principal: Principal | None = None
        metrics.RPC_IN_FLIGHT.labels(service).inc()

    async def authenticate(
        self, callers: CallerCheck | None, context: grpc.aio.ServicerContext, stream: bool
    ) -> None:
        """Verifies the caller (raises a domain error); streams are followed
        so that a key revoked mid-stream ends them."""
        if callers is None:
            return
        principal: Principal = await callers.check(self.method, context)
        principal_var.set(principal)
        self.principal = principal
        self.span.set_attribute("mlmesh.key_id", principal.key_id)
        if stream:
            self.live = callers.live.add(principal)

    def admitted(
        self, callers: CallerCheck | None
    ) -> contextlib.AbstractAsyncContextManager[object]:
        """The service's admission of this call (limits, usage), if it has one."""
        if callers is None or callers.admission is None or self.principal is None:
            return contextlib.nullcontext()
        return callers.admission(self.principal, self.method)

    def ended_because(self) -> str | None:
        return self.live.ended_because if self.live is not None else None

    async def fail(
        self, error: BaseException, context: grpc.aio.ServicerContext, domain: str
    ) -> None:
        """Maps an exception to a status and aborts the call (always raises)."""
        if isinstance(error, grpc.aio.AioRpcError):
            # A peer's failure we did not handle: pass its status (and its
            # google.rpc details) back as it is, rather than as INTERNAL.
            self.code = error.code()
            details = [
                (k, v)
                for k, v in (error.trailing_metadata() or ())
                if k == "grpc-status-details-bin"
            ]
            await context.abort(error.code(), error.details() or "", tuple(details))
        if isinstance(error, MlmeshError):
            mapped = error
        else:
            log.exception("unhandled error in %s", self.method)
            mapped = MlmeshError(
                "internal error; see the server log for this request id",
                Reason.ERROR_REASON_INTERNAL,
                {"request_id": request_id_var.get()},
            )
        status = to_status(mapped, domain)
        self.code = status.code
        if mapped.code is not grpc.StatusCode.INTERNAL:
            log.info("%s failed: %s %s", self.method, mapped.code.name, mapped.message)
        await context.abort(status.code, status.details, status.trailing_metadata)

    def close(self, callers: CallerCheck | None, error: BaseException | None = None) -> None:
        if self.live is not None and callers is not None:
            self.live.done = True
            callers.live.discard(self.live)
        if isinstance(error, asyncio.CancelledError):
            self.code = grpc.StatusCode.CANCELLED
        elif isinstance(error, Exception) and self.code is grpc.StatusCode.OK:
            # context.abort() from a handler, or a grpc-level failure
            self.code = grpc.StatusCode.UNKNOWN
        elapsed = time.perf_counter() - self.start
        metrics.RPC_IN_FLIGHT.labels(self.service).dec()
        metrics.RPC_REQUESTS.labels(self.service, self.method, self.code.name).inc()
        metrics.RPC_DURATION.labels(self.service, self.method).observe(elapsed)
        self.span.set_attribute("rpc.grpc.status_code", self.code.value[0])
        if self.code is not grpc.StatusCode.OK:
            self.span.set_status(Status(StatusCode.ERROR, self.code.name))
        self.span.end()


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """The chassis' one server interceptor (see the module docstring)."""

    def __init__(self, service: str, error_domain: str, callers: CallerCheck | None = None) -> None:
        self.service = service
        self.domain = error_domain
        self.callers = callers

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        return _wrap(handler, self.service, method, self.domain, self.callers)


class _Undecodable:
    """What a request that failed to decode becomes (see ``_decoding``)."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


def _decoding(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that turns bad bytes into ``_Undecodable`` instead of
    raising inside grpc (which answers UNKNOWN and logs a traceback)."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError):
            return _UNDECODABLE

    return decode


def _checked(request: Any) -> Any:
    if request is _UNDECODABLE:
        raise InvalidArgument.field("request", "the request is not a valid protobuf message")
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        checked = _checked(request)
        await check_async(checked)  # each message of a client stream
        yield checked


async def _aborting(
    scope: _CallScope,
    error: BaseException,
    context: grpc.aio.ServicerContext,
    domain: str,
) -> None:
    """Maps what ended a call to a status (always raises)."""
    ended = scope.ended_because()
    if ended is not None and isinstance(error, asyncio.CancelledError | Exception):
        # Its key stopped authenticating: LiveCalls cancelled the call's task.
        await scope.fail(Unauthenticated(f"stream ended: {ended}"), context, domain)
    if isinstance(error, grpc.aio.AbortError | asyncio.CancelledError) or not isinstance(
        error, Exception
    ):
        raise error
    await scope.fail(error, context, domain)


def _wrap(
    handler: grpc.RpcMethodHandler,
    service: str,
    method: str,
    domain: str,
    callers: CallerCheck | None,
) -> grpc.RpcMethodHandler:
    client_streams = bool(handler.stream_unary or handler.stream_stream)
    decode = _decoding(handler.request_deserializer)

    async def request_of(request: Any) -> Any:
        """The request decoded and validated against its contract's rules
        (a client stream: each message as it arrives)."""
        if client_streams:
            return _checked_stream(request)
        checked = _checked(request)
        await check_async(checked)
        return checked

    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            scope = _CallScope(service, method, context)
            error: BaseException | None = None
            try:
                await scope.authenticate(callers, context, stream=client_streams)
                async with scope.admitted(callers):
                    return await inner(await request_of(request), context)
            except BaseException as exc:  # mapped to a status
                error = exc
                await _aborting(scope, exc, context, domain)
            finally:
                scope.close(callers, error)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary_response,
            request_deserializer=decode,
            response_serializer=handler.response_serializer,
        )

    inner_stream = handler.unary_stream or handler.stream_stream

    async def stream_response(
        request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        scope = _CallScope(service, method, context)
        error: BaseException | None = None
        try:
            await scope.authenticate(callers, context, stream=True)
            async with scope.admitted(callers):
                async for response in inner_stream(await request_of(request), context):
                    yield response
                    if scope.ended_because() is not None:
                        raise asyncio.CancelledError
        except BaseException as exc:  # mapped to a status
            error = exc
            await _aborting(scope, exc, context, domain)
        finally:
            scope.close(callers, error)

    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return factory(
        stream_response,
        request_deserializer=decode,
        response_serializer=handler.response_serializer,
    )


def propagation(timeout: float | None = None) -> tuple[list[tuple[str, str]], float | None]:
    """What a call to a peer carries from the call being served: trace
    context, request id and this service's own key (as metadata) and the
    remaining deadline (as the timeout, shortened from ``timeout``). The
    client interceptors add these to every call; hot paths that skip the
    interceptors (they wrap every streamed message) pass them explicitly:
    ``stub.M(req, metadata=m, timeout=t)``."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata = list(carrier.items())
    request_id = request_id_var.get()
    if request_id:
        metadata.append((REQUEST_ID_HEADER, request_id))
    metadata.extend(service_identity().metadata())
    left = remaining_time()
    if left is not None:
        timeout = left if timeout is None else min(timeout, left)
    return metadata, timeout


def _outgoing(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()))
    extra, timeout = propagation(details.timeout)
    for key, value in extra:
        # A caller's own request id or key (set on the call) wins.
        if key not in (REQUEST_ID_HEADER, "authorization") or key not in metadata:
            metadata[key] = value
    return grpc.aio.ClientCallDetails(
        details.method, timeout, metadata, details.credentials, details.wait_for_ready
    )


Rewrite = Callable[[grpc.aio.ClientCallDetails], grpc.aio.ClientCallDetails]


class _Rewriting:
    """A client interceptor that rewrites each call's details (metadata,
    timeout) before sending it; one class per call shape below."""

    def __init__(self, rewrite: Rewrite) -> None:
        self._rewrite = rewrite

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._rewrite(details), request)

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._rewrite(details), request)

    async def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._rewrite(details), request_iterator)

    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._rewrite(details), request_iterator)


class _UnaryUnary(_Rewriting, grpc.aio.UnaryUnaryClientInterceptor):
    pass


class _UnaryStream(_Rewriting, grpc.aio.UnaryStreamClientInterceptor):
    pass


class _StreamUnary(_Rewriting, grpc.aio.StreamUnaryClientInterceptor):
    pass


class _StreamStream(_Rewriting, grpc.aio.StreamStreamClientInterceptor):
    pass


def _rewriting(rewrite: Rewrite) -> list[Any]:
    return [cls(rewrite) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for every channel a service opens to a peer."""
    return _rewriting(_outgoing)


def api_key_interceptors(api_key: str) -> list[Any]:
    """Interceptors that send ``api_key`` on every call that carries no key."""
    header = f"Bearer {api_key}"

    def with_key(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()))
        if "authorization" not in metadata:
            metadata.add("authorization", header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    return _rewriting(with_key)

"""Server and client interceptors: the cross-cutting work of every call.

The server side does, in one wrapper per call: request id (from
``x-request-id`` or new), W3C trace context extraction and a server span,
the call's deadline into a contextvar, metrics, an access log line for
failures, and the single mapping of domain errors to google.rpc.Status.

The client side injects trace context and the request id, and shrinks each
outgoing call's timeout to what is left of the current call's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mlmesh_chassis import metrics
from mlmesh_chassis.context import (
    REQUEST_ID_HEADER,
    deadline_var,
    new_request_id,
    remaining_time,
    request_id_var,
)
from mlmesh_chassis.errors import MlmeshError, Reason, to_status

log = logging.getLogger("mlmesh.rpc")
_tracer = trace.get_tracer("mlmesh.chassis")


class _CallScope:
    """Everything set up for one served call, and its teardown."""

    __slots__ = ("code", "method", "service", "span", "start", "tokens")

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
        self.tokens = (
            request_id_var.set(request_id),
            deadline_var.set(deadline),
            trace.context_api.attach(trace.set_span_in_context(self.span)),
        )
        metrics.RPC_IN_FLIGHT.labels(service).inc()

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

    def close(self, error: BaseException | None = None) -> None:
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
        request_token, deadline_token, context_token = self.tokens
        trace.context_api.detach(context_token)
        deadline_var.reset(deadline_token)
        request_id_var.reset(request_token)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """The chassis' one server interceptor (see the module docstring)."""

    def __init__(self, service: str, error_domain: str) -> None:
        self.service = service
        self.domain = error_domain

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        return _wrap(handler, self.service, method, self.domain)


def _wrap(
    handler: grpc.RpcMethodHandler, service: str, method: str, domain: str
) -> grpc.RpcMethodHandler:
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            scope = _CallScope(service, method, context)
            error: BaseException | None = None
            try:
                return await inner(request, context)
            except Exception as exc:  # mapped to a status below
                error = exc
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await scope.fail(exc, context, domain)
            except BaseException as exc:
                error = exc
                raise
            finally:
                scope.close(error)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary_response,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    inner_stream = handler.unary_stream or handler.stream_stream

    async def stream_response(
        request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        scope = _CallScope(service, method, context)
        error: BaseException | None = None
        try:
            async for response in inner_stream(request, context):
                yield response
        except Exception as exc:  # mapped to a status below
            error = exc
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await scope.fail(exc, context, domain)
        except BaseException as exc:
            error = exc
            raise
        finally:
            scope.close(error)

    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return factory(
        stream_response,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def propagation(timeout: float | None = None) -> tuple[list[tuple[str, str]], float | None]:
    """What a call to a peer carries from the call being served: trace
    context and request id (as metadata) and the remaining deadline (as the
    timeout, shortened from ``timeout``). The client interceptors add these
    to every call; hot paths that skip the interceptors (they wrap every
    streamed message) pass them explicitly: ``stub.M(req, metadata=m, timeout=t)``."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata = list(carrier.items())
    request_id = request_id_var.get()
    if request_id:
        metadata.append((REQUEST_ID_HEADER, request_id))
    left = remaining_time()
    if left is not None:
        timeout = left if timeout is None else min(timeout, left)
    return metadata, timeout


def _outgoing(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()))
    extra, timeout = propagation(details.timeout)
    for key, value in extra:
        if key != REQUEST_ID_HEADER or key not in metadata:
            metadata[key] = value
    return grpc.aio.ClientCallDetails(
        details.method, timeout, metadata, details.credentials, details.wait_for_ready
    )


class _ClientInterceptor:
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(_outgoing(details), request)

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(_outgoing(details), request)

    async def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(_outgoing(details), request_iterator)

    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(_outgoing(details), request_iterator)


class UnaryUnaryPropagator(_ClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    pass


class UnaryStreamPropagator(_ClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    pass


class StreamUnaryPropagator(_ClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    pass


class StreamStreamPropagator(_ClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    pass


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for every channel a service opens to a peer."""
    return [
        UnaryUnaryPropagator(),
        UnaryStreamPropagator(),
        StreamUnaryPropagator(),
        StreamStreamPropagator(),
    ]

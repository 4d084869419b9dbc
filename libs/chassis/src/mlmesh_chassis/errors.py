"""Domain errors and their one mapping to google.rpc.Status.

Domain code raises these (no grpc imports needed in domain modules); the server
interceptor turns them into a status with an ErrorInfo (reason from
mlmesh.common.v1.ErrorReason, domain `mlmesh.<area>`, metadata holding every
variable in the message) plus BadRequest / RetryInfo / QuotaFailure details
where they apply (AIP-193).

Errors are bounded however large the offending input: an echoed value longer
than ``ECHO_CHARS`` is cut to a prefix plus "…" (in the metadata and wherever
the message repeats it), the message to ``MAX_MESSAGE_CHARS``, each violation's
texts and their number, and the whole serialized status to
``MAX_STATUS_BYTES``. A status larger than Envoy's header limit would reach the
caller as a protocol error instead of the status.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from mlmesh.common.v1 import errors_pb2

Reason = errors_pb2.ErrorReason

# Longest echoed value (metadata values, field paths): a prefix and "…" beyond.
ECHO_CHARS = 64
# Longest status message and violation description.
MAX_MESSAGE_CHARS = 1024
MAX_DESCRIPTION_CHARS = 256
# Most field or quota violations reported; a last one says how many were left out.
MAX_VIOLATIONS = 10
# The serialized google.rpc.Status (sent base64-encoded in a trailer, beside the
# message): far below Envoy's 60 KiB header limit.
MAX_STATUS_BYTES = 8 * 1024
_ELLIPSIS = "…"


def shorten(value: object, limit: int = ECHO_CHARS) -> str:
    """``value`` as text, cut to ``limit`` characters plus "…" when longer."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + _ELLIPSIS


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its dotted path and what is wrong with it."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted quota: whose (subject) and what was exceeded."""

    subject: str
    description: str


@dataclass
class MlmeshError(Exception):
    """Base of every error a service maps to a gRPC status.

    ``metadata`` must hold every variable that appears in ``message``.
    """

    message: str
    reason: int = Reason.ERROR_REASON_INTERNAL
    metadata: dict[str, str] = field(default_factory=dict)
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __post_init__(self) -> None:
        metadata = {shorten(k): str(v) for k, v in self.metadata.items()}
        message = self.message
        for key, value in metadata.items():
            if len(value) > ECHO_CHARS:
                short = shorten(value)
                # the message echoes the same variable: cut it there too
                message = message.replace(repr(value), repr(short)).replace(value, short)
                metadata[key] = short
        self.metadata = metadata
        self.message = shorten(message, MAX_MESSAGE_CHARS)
        super().__init__(self.message)

    def extra_details(self) -> list[object]:
        return []


class InvalidArgument(MlmeshError):
    def __init__(
        self, message: str, violations: list[FieldViolation] | None = None, **metadata: object
    ) -> None:
        super().__init__(
            message,
            Reason.ERROR_REASON_INVALID_ARGUMENT,
            {k: str(v) for k, v in metadata.items()},
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        self.violations = violations or []

    @classmethod
    def listing(
        cls,
        violations: list[FieldViolation],
        shown: int,
        *,
        prefix: str = "",
        unnamed: str = "",
        **metadata: object,
    ) -> InvalidArgument:
        """One INVALID_ARGUMENT carrying every violation: its message names the
        first ``shown`` as ``field: description`` (``unnamed`` for a violation
        without a field) and counts the rest."""
        text = "; ".join(f"{v.field or unnamed}: {v.description}" for v in violations[:shown])
        more = len(violations) - shown
        return cls(
            prefix + text + (f" (and {more} more)" if more > 0 else ""), violations, **metadata
        )

    @classmethod
    def field(cls, field_path: str, description: str) -> InvalidArgument:
        return cls(
            f"{field_path}: {description}",
            [FieldViolation(field_path, description)],
            field=field_path,
        )

    def extra_details(self) -> list[object]:
        if not self.violations:
            return []
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=field, description=description
                    )
                    for field, description in _bounded(
                        [(v.field, v.description) for v in self.violations]
                    )
                ]
            )
        ]


# The cause-specific reason (AIP-193) of each resource type's NOT_FOUND and
# ALREADY_EXISTS; a type not listed gets the generic reason.
_NOT_FOUND_REASONS = {
    "model": Reason.ERROR_REASON_MODEL_NOT_FOUND,
    "model version": Reason.ERROR_REASON_MODEL_VERSION_NOT_FOUND,
    "alias": Reason.ERROR_REASON_ALIAS_NOT_FOUND,
    "experiment": Reason.ERROR_REASON_EXPERIMENT_NOT_FOUND,
    "key": Reason.ERROR_REASON_API_KEY_NOT_FOUND,
    "feature view": Reason.ERROR_REASON_FEATURE_VIEW_NOT_FOUND,
    "feature service": Reason.ERROR_REASON_FEATURE_SERVICE_NOT_FOUND,
    "operation": Reason.ERROR_REASON_OPERATION_NOT_FOUND,
    "data source": Reason.ERROR_REASON_DATA_SOURCE_NOT_FOUND,
    "collection": Reason.ERROR_REASON_COLLECTION_NOT_FOUND,
    "snapshot": Reason.ERROR_REASON_SNAPSHOT_NOT_FOUND,
    "policy": Reason.ERROR_REASON_POLICY_NOT_FOUND,
    "point": Reason.ERROR_REASON_POINT_NOT_FOUND,
    "job": Reason.ERROR_REASON_JOB_NOT_FOUND,
    "callable": Reason.ERROR_REASON_CALLABLE_NOT_FOUND,
}
_ALREADY_EXISTS_REASONS = {
    "model": Reason.ERROR_REASON_MODEL_ALREADY_EXISTS,
    "experiment": Reason.ERROR_REASON_EXPERIMENT_ALREADY_EXISTS,
    "collection": Reason.ERROR_REASON_COLLECTION_ALREADY_EXISTS,
    "policy": Reason.ERROR_REASON_POLICY_ALREADY_EXISTS,
}


class NotFound(MlmeshError):
    """The named resource does not exist; the reason names its type
    (MODEL_NOT_FOUND, ALIAS_NOT_FOUND, ...), or ``reason`` when given."""

    def __init__(
        self,
        resource_type: str,
        name: str,
        message: str | None = None,
        reason: int | None = None,
    ) -> None:
        super().__init__(
            message or f"{resource_type} {name!r} not found",
            reason or _NOT_FOUND_REASONS.get(resource_type, Reason.ERROR_REASON_NOT_FOUND),
            {"resource_type": resource_type, "name": name},
            grpc.StatusCode.NOT_FOUND,
        )


class AlreadyExists(MlmeshError):
    def __init__(self, resource_type: str, name: str) -> None:
        super().__init__(
            f"{resource_type} {name!r} already exists",
            _ALREADY_EXISTS_REASONS.get(resource_type, Reason.ERROR_REASON_ALREADY_EXISTS),
            {"resource_type": resource_type, "name": name},
            grpc.StatusCode.ALREADY_EXISTS,
        )


class Unauthenticated(MlmeshError):
    """No credentials, or ones that are not (or no longer) valid; ``reason``
    says which (API_KEY_MISSING, API_KEY_INVALID, API_KEY_REVOKED, ...)."""

    def __init__(
        self,
        message: str,
        reason: int = Reason.ERROR_REASON_UNAUTHENTICATED,
        **metadata: object,
    ) -> None:
        super().__init__(
            message,
            reason,
            {k: str(v) for k, v in metadata.items()},
            grpc.StatusCode.UNAUTHENTICATED,
        )


class PermissionDenied(MlmeshError):
    """Valid credentials that do not grant this operation."""

    def __init__(self, message: str, **metadata: object) -> None:
        super().__init__(
            message,
            Reason.ERROR_REASON_PERMISSION_DENIED,
            {k: str(v) for k, v in metadata.items()},
            grpc.StatusCode.PERMISSION_DENIED,
        )


class FailedPrecondition(MlmeshError):
    def __init__(
        self,
        message: str,
        reason: int = Reason.ERROR_REASON_FAILED_PRECONDITION,
        **metadata: object,
    ) -> None:
        super().__init__(
            message,
            reason,
            {k: str(v) for k, v in metadata.items()},
            grpc.StatusCode.FAILED_PRECONDITION,
        )


class Aborted(MlmeshError):
    """A concurrent change or a cut-off stream: the caller may retry the whole call."""

    def __init__(
        self,
        message: str,
        reason: int = Reason.ERROR_REASON_CONCURRENT_MODIFICATION,
        **metadata: object,
    ) -> None:
        super().__init__(
            message, reason, {k: str(v) for k, v in metadata.items()}, grpc.StatusCode.ABORTED
        )


class DataLoss(MlmeshError):
    def __init__(
        self, message: str, reason: int = Reason.ERROR_REASON_CHECKSUM_MISMATCH, **metadata: object
    ) -> None:
        super().__init__(
            message, reason, {k: str(v) for k, v in metadata.items()}, grpc.StatusCode.DATA_LOSS
        )


class Unavailable(MlmeshError):
    """A dependency is down; RetryInfo tells the caller when to try again."""

    def __init__(self, message: str, retry_after_s: float = 1.0, **metadata: object) -> None:
        super().__init__(
            message,
            Reason.ERROR_REASON_BACKEND_UNAVAILABLE,
            {k: str(v) for k, v in metadata.items()},
            grpc.StatusCode.UNAVAILABLE,
        )
        self.retry_after_s = retry_after_s

    def extra_details(self) -> list[object]:
        return [_retry_info(self.retry_after_s)]


class ResourceExhausted(MlmeshError):
    def __init__(
        self,
        message: str,
        violations: list[QuotaViolation],
        retry_after_s: float,
        **metadata: object,
    ) -> None:
        super().__init__(
            message,
            Reason.ERROR_REASON_QUOTA_EXCEEDED,
            {k: str(v) for k, v in metadata.items()},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        self.violations = violations
        self.retry_after_s = retry_after_s

    def extra_details(self) -> list[object]:
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
                for subject, description in _bounded(
                    [(v.subject, v.description) for v in self.violations]
                )
            ]
        )
        return [quota, _retry_info(self.retry_after_s)]


def _bounded(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(field, description) pairs with both texts and their number capped."""
    kept = [
        (shorten(first, 2 * ECHO_CHARS), shorten(second, MAX_DESCRIPTION_CHARS))
        for first, second in pairs[:MAX_VIOLATIONS]
    ]
    if len(pairs) > MAX_VIOLATIONS:
        kept.append(("", f"{len(pairs) - MAX_VIOLATIONS} more violations left out"))
    return kept


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def to_status(error: MlmeshError, domain: str) -> grpc.Status:
    """Builds the grpc.Status (with grpc-status-details-bin) for a domain error."""
    info = error_details_pb2.ErrorInfo(
        reason=Reason.Name(error.reason).removeprefix("ERROR_REASON_"),
        domain=domain,
        metadata={shorten(k): shorten(v) for k, v in error.metadata.items()},
    )
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name),
        message=shorten(error.message, MAX_MESSAGE_CHARS),
        details=[_pack(message) for message in [info, *error.extra_details()]],
    )
    if status.ByteSize() > MAX_STATUS_BYTES:
        # Too many variables or violations: keep the ErrorInfo's reason and
        # domain, and only as much metadata as fits.
        metadata = dict(info.metadata)
        info.metadata.clear()
        for key, value in metadata.items():
            info.metadata[key] = value
            if info.ByteSize() + len(status.message.encode()) > MAX_STATUS_BYTES // 2:
                del info.metadata[key]
                break
        del status.details[:]
        status.details.append(_pack(info))
    return rpc_status.to_status(status)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


@dataclass
class ErrorDetails:
    """What a client can read from a failed call's status (for tests and SDK)."""

    code: grpc.StatusCode
    message: str
    error_info: error_details_pb2.ErrorInfo | None = None
    bad_request: error_details_pb2.BadRequest | None = None
    retry_info: error_details_pb2.RetryInfo | None = None
    quota_failure: error_details_pb2.QuotaFailure | None = None


def details_of(error: grpc.RpcError) -> ErrorDetails:
    """Unpacks the google.rpc details of a failed call."""
    result = ErrorDetails(code=error.code(), message=error.details() or "")  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return result
    for packed in status.details:
        for attr, cls in (
            ("error_info", error_details_pb2.ErrorInfo),
            ("bad_request", error_details_pb2.BadRequest),
            ("retry_info", error_details_pb2.RetryInfo),
            ("quota_failure", error_details_pb2.QuotaFailure),
        ):
            if packed.Is(cls.DESCRIPTOR):
                message = cls()
                packed.Unpack(message)
                setattr(result, attr, message)
    return result

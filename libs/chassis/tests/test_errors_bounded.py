"""Errors stay small however large the values they are about."""

from __future__ import annotations

from google.rpc import error_details_pb2, status_pb2
from mlmesh_chassis.errors import (
    ECHO_CHARS,
    MAX_STATUS_BYTES,
    FieldViolation,
    InvalidArgument,
    NotFound,
    shorten,
    to_status,
)


def _status(error: InvalidArgument | NotFound) -> status_pb2.Status:
    status = to_status(error, "mlmesh.test")
    (binary,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    return status_pb2.Status.FromString(binary)


def test_shorten_keeps_a_prefix() -> None:
    assert shorten("abc") == "abc"
    assert shorten("x" * 100) == "x" * ECHO_CHARS + "…"


def test_an_echoed_value_is_cut_in_the_message_and_the_metadata() -> None:
    huge = "n" * 40_000
    error = NotFound("model", huge)
    assert len(error.message) < 200
    assert error.metadata["name"] == "n" * ECHO_CHARS + "…"
    status = _status(error)
    assert status.ByteSize() < 1024


def test_many_or_long_violations_are_bounded() -> None:
    violations = [FieldViolation("f" * 5000, "d" * 5000) for _ in range(500)]
    error = InvalidArgument("m" * 100_000, violations, field="f" * 5000)
    status = _status(error)
    assert status.ByteSize() <= MAX_STATUS_BYTES
    assert len(status.message) <= 1025
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad)
    assert len(bad.field_violations) == 11
    assert bad.field_violations[-1].description == "490 more violations left out"


def test_a_status_too_large_keeps_its_error_info() -> None:
    violations = [FieldViolation("字" * 500, "字" * 500) for _ in range(20)]
    status = _status(InvalidArgument("bad", violations, field="f"))
    assert status.ByteSize() <= MAX_STATUS_BYTES
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "INVALID_ARGUMENT"

"""Every value a caller supplies to GatewayService, checked before anything
is reserved: one INVALID_ARGUMENT naming each bad field (BadRequest)."""

from __future__ import annotations

from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh_chassis.errors import FieldViolation, InvalidArgument
from mlmesh_metering import events as checks

# Embed: at most this many texts, each at most this many UTF-8 bytes.
MAX_EMBED_TEXTS = 256
MAX_EMBED_TEXT_BYTES = 64 * 1024


def check_model(model: str, path: str) -> None:
    violations: list[FieldViolation] = []
    checks.check(violations, path, model, checks.MODEL, checks.MODEL_RULE)
    if violations:
        raise InvalidArgument(f"{path}: {checks.MODEL_RULE}", violations, field=path)


def check_embed(request: rpc.EmbedRequest) -> None:
    violations: list[FieldViolation] = []
    checks.check(violations, "model.model", request.model.model, checks.MODEL, checks.MODEL_RULE)
    if not 1 <= len(request.texts) <= MAX_EMBED_TEXTS:
        violations.append(FieldViolation("texts", f"1 to {MAX_EMBED_TEXTS} texts"))
    for i, text in enumerate(request.texts):
        if len(text.encode()) > MAX_EMBED_TEXT_BYTES:
            violations.append(
                FieldViolation(f"texts[{i}]", f"at most {MAX_EMBED_TEXT_BYTES} bytes (UTF-8)")
            )
    if violations:
        raise InvalidArgument(
            "; ".join(f"{v.field}: {v.description}" for v in violations[:5]), violations
        )

"""Every value a caller supplies to GatewayService, checked before anything
is reserved: one INVALID_ARGUMENT naming each bad field (BadRequest)."""

from __future__ import annotations

from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh_chassis.errors import FieldViolation, InvalidArgument
from mlmesh_chassis.generation import MAX_PROMPT_BYTES, prompt_bytes
from mlmesh_metering import events as checks

# Embed: at most this many texts, each at most this many UTF-8 bytes.
MAX_EMBED_TEXTS = 256
MAX_EMBED_TEXT_BYTES = 64 * 1024


def check_model(model: str, path: str) -> None:
    violations: list[FieldViolation] = []
    checks.check(violations, path, model, checks.MODEL, checks.MODEL_RULE)
    if violations:
        raise InvalidArgument(f"{path}: {checks.MODEL_RULE}", violations, field=path)


def check_generate(request: rpc.GenerateRequest) -> None:
    """Every value the caller supplies, before anything is reserved (one
    INVALID_ARGUMENT naming each bad field): ids and names the ledger keeps,
    and the prompt's size (before any tokenizer sees it)."""
    inner = request.request
    violations: list[FieldViolation] = []
    checks.check(
        violations, "region", request.region, checks.REGION, checks.REGION_RULE, optional=True
    )
    checks.check(
        violations, "request.model.model", inner.model.model, checks.MODEL, checks.MODEL_RULE
    )
    checks.check(
        violations,
        "request.request_id",
        inner.request_id,
        checks.REQUEST_ID,
        checks.REQUEST_ID_RULE,
        optional=True,
    )
    size = prompt_bytes(inner)
    if size > MAX_PROMPT_BYTES:
        kind = inner.WhichOneof("prompt") or "text"
        violations.append(
            FieldViolation(f"request.{kind}", f"at most {MAX_PROMPT_BYTES} bytes (UTF-8)")
        )
    if violations:
        raise InvalidArgument(
            "; ".join(f"{v.field}: {v.description}" for v in violations),
            violations,
            prompt_bytes=size,
        )


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

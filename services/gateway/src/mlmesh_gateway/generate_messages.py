"""GatewayService's own Generate messages, to and from the llm's.

The gateway's contract owns its request and stream messages (prompt,
sampling, images, timings), so what the llm keeps internal (its load report)
never reaches a caller. Chat, SamplingParams, Image and the timings have the
llm's field numbers and types (a unit test holds them equal), so each is
carried over as its wire bytes. The deprecated shape, an llm.v1 request
inside ``request``, is still served: such a caller also gets the llm's
message in the deprecated ``response`` (load cleared).
"""

from __future__ import annotations

from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_chassis.errors import FieldViolation, InvalidArgument


def uses_deprecated_request(request: rpc.GenerateRequest) -> bool:
    return request.HasField("request")


def to_llm(request: rpc.GenerateRequest) -> llm_rpc.GenerateRequest:
    """The llm's request for a caller's (a copy the gateway may change)."""
    inner = llm_rpc.GenerateRequest()
    if uses_deprecated_request(request):
        inner.CopyFrom(request.request)
        return inner
    violations = []
    if not request.HasField("model"):
        violations.append(FieldViolation("model", "required"))
    kind = request.WhichOneof("prompt")
    if kind is None:
        violations.append(FieldViolation("prompt", "set text or chat"))
    if violations:
        raise InvalidArgument("set model and a prompt (text or chat)", violations)
    inner.model.CopyFrom(request.model)
    if kind == "text":
        inner.text = request.text
    else:
        inner.chat.MergeFromString(request.chat.SerializeToString())
    if request.HasField("sampling"):
        inner.sampling.MergeFromString(request.sampling.SerializeToString())
    for image in request.images:
        inner.images.add(data=image.data, media_type=image.media_type)
    inner.request_id = request.request_id
    return inner


def to_gateway(
    chunk: llm_rpc.GenerateResponse, region: str, *, deprecated: bool
) -> rpc.GenerateResponse:
    """The caller's stream message for one of the llm's (never its load)."""
    response = rpc.GenerateResponse(
        region=region,
        text=chunk.text,
        token_count=chunk.token_count,
        finish_reason=chunk.finish_reason,  # type: ignore[arg-type]
    )
    if chunk.HasField("usage"):
        response.usage.CopyFrom(chunk.usage)
    if chunk.HasField("timings"):
        response.timings.MergeFromString(chunk.timings.SerializeToString())
    if chunk.HasField("model"):
        response.model.CopyFrom(chunk.model)
    if deprecated:
        response.response.CopyFrom(chunk)
        response.response.ClearField("load")
    return response

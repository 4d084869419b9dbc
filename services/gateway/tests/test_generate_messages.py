"""The gateway's own Generate messages against the llm's: the types carried
as wire bytes have the same fields, a request converts both ways of asking,
and the llm's load never reaches a caller."""

from __future__ import annotations

import pytest
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.llm.v1 import llm_pb2
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh_chassis.errors import InvalidArgument
from mlmesh_gateway.generate_messages import to_gateway, to_llm


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (pb.Chat, llm_pb2.Chat),
        (pb.ChatMessage, llm_pb2.ChatMessage),
        (pb.SamplingParams, llm_pb2.SamplingParams),
        (pb.Image, llm_pb2.Image),
        (pb.GenerateTimings, llm_pb2.Timings),
    ],
)
def test_wire_copied_types_have_the_llms_fields(ours, theirs):
    def fields(message):
        return {(f.number, f.name, f.type, f.label) for f in message.DESCRIPTOR.fields}

    assert fields(ours) == fields(theirs)


def test_a_request_in_the_gateways_own_shape():
    request = rpc.GenerateRequest(
        model={"model": "chat", "alias": "champion"},
        chat=pb.Chat(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="hi")]),
        sampling=pb.SamplingParams(max_tokens=7, stop=["\n"]),
        images=[pb.Image(data=b"png", media_type="image/png")],
        request_id="r-1",
    )
    inner = to_llm(request)
    assert inner.model.alias == "champion"
    assert inner.chat.messages[0].role == llm_pb2.CHAT_ROLE_USER
    assert inner.chat.messages[0].content == "hi"
    assert inner.sampling.max_tokens == 7 and list(inner.sampling.stop) == ["\n"]
    assert not inner.sampling.HasField("temperature")  # unset stays unset
    assert inner.images[0].data == b"png" and inner.request_id == "r-1"
    assert to_llm(rpc.GenerateRequest(model={"model": "chat"}, text="x")).text == "x"


def test_the_deprecated_shape_is_still_served():
    old = llm_rpc.GenerateRequest(model={"model": "chat"}, text="hi")
    inner = to_llm(rpc.GenerateRequest(request=old))
    assert inner == old and inner is not old


def test_a_request_without_model_or_prompt_is_refused():
    with pytest.raises(InvalidArgument) as raised:
        to_llm(rpc.GenerateRequest())
    assert [v.field for v in raised.value.violations] == ["model", "prompt"]


def test_the_llms_load_never_reaches_a_caller():
    chunk = llm_rpc.GenerateResponse(
        text="done",
        token_count=2,
        finish_reason=llm_pb2.FINISH_REASON_LENGTH,
        usage={"prompt_tokens": 3, "completion_tokens": 2},
        timings=llm_pb2.Timings(time_to_first_token={"nanos": 5}),
        load=llm_pb2.Load(waiting_requests=4),
        model={"model": "chat", "version": 2},
    )
    ours = to_gateway(chunk, "eu", deprecated=False)
    assert ours.text == "done" and ours.token_count == 2 and ours.region == "eu"
    assert ours.finish_reason == pb.FINISH_REASON_LENGTH
    assert ours.usage.prompt_tokens == 3 and ours.model.version == 2
    assert ours.timings.time_to_first_token.nanos == 5
    assert not ours.HasField("response")
    old = to_gateway(chunk, "eu", deprecated=True)
    assert old.response.text == "done" and not old.response.HasField("load")
    assert chunk.HasField("load")  # the router's message is left as it was

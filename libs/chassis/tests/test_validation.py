"""Requests checked against their contract's buf.validate rules: the field
paths and descriptions of the violations, what is skipped, the rules of
every contract compiling, and the check in front of a served handler (a
unary call and each message of a client stream)."""

from __future__ import annotations

from typing import ClassVar

import grpc
import pytest
from google.rpc import code_pb2
from mlmesh.gateway.v1 import gateway_pb2, key_directory_service_pb2, key_service_pb2
from mlmesh.llm.v1 import llm_pb2, llm_service_pb2
from mlmesh.registry.v1 import model_pb2, registry_service_pb2_grpc
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh_chassis import validation
from mlmesh_chassis.auth import KeyView
from mlmesh_chassis.config import ServiceSettings
from mlmesh_chassis.contracts import all_services
from mlmesh_chassis.errors import InvalidArgument, to_status
from mlmesh_chassis.server import start_service
from mlmesh_chassis.testing import bearer_metadata, directory_key, expect_error


def test_every_contract_rule_compiles():
    types = [m.input_type for s in all_services() for m in s.methods]
    assert len(types) > 40
    validation.compile_rules(types)  # raises on a rule protovalidate cannot compile
    assert validation.has_rules(rpc.GetModelRequest.DESCRIPTOR)


def test_a_type_without_rules_is_not_walked():
    assert not validation.has_rules(key_directory_service_pb2.WatchKeysRequest.DESCRIPTOR)
    assert validation.violations_of(key_directory_service_pb2.WatchKeysRequest()) == []


def test_violations_name_each_field_by_its_path():
    request = key_service_pb2.CreateKeyRequest(
        key=gateway_pb2.Key(
            display_name="x" * 101,
            scopes=gateway_pb2.KeyScopes(model_patterns=["ok", ""], services=[0, 99]),
            limits=gateway_pb2.KeyLimits(token_quota=-1),
        )
    )
    found = {v.field: v.description for v in validation.violations_of(request)}
    assert set(found) == {
        "key.display_name",
        "key.scopes.model_patterns[1]",
        "key.scopes.services[0]",  # UNSPECIFIED
        "key.scopes.services[1]",  # 99: no PlatformService (defined_only on the items)
        "key.limits.token_quota",
    }
    assert "100" in found["key.display_name"]


def test_nested_messages_map_keys_and_required_fields():
    assert [v.field for v in validation.violations_of(rpc.CreateModelRequest())] == ["model"]
    bad_tag = "Bad Key " + "k" * 200
    request = rpc.CreateModelRequest(model=model_pb2.Model(name="ok-model", tags={bad_tag: "v"}))
    (violation,) = validation.violations_of(request)
    assert violation.field.startswith("model.tags['Bad Key ")
    assert len(violation.field) < 100  # the key is echoed as a short prefix only
    generate = llm_service_pb2.GenerateRequest(
        model={"model": "tiny"},
        text="hi",
        sampling=llm_pb2.SamplingParams(max_tokens=0, stop=["a", ""]),
    )
    assert {v.field for v in validation.violations_of(generate)} == {
        "sampling.max_tokens",
        "sampling.stop[1]",
    }
    # exactly one prompt: the oneof is required
    assert [
        v.field
        for v in validation.violations_of(llm_service_pb2.GenerateRequest(model={"model": "tiny"}))
    ] == ["prompt"]


def test_patterns_match_the_whole_value():
    # RE2 `$` is the end of the text: a trailing newline is not a name.
    assert validation.violations_of(rpc.GetModelRequest(name="chat\n"))
    assert not validation.violations_of(rpc.GetModelRequest(name="chat"))


def test_check_raises_invalid_argument_with_a_bad_request():
    request = rpc.SetAliasRequest(model="M", alias="", version=0, reason="r" * 5000)
    with pytest.raises(InvalidArgument) as raised:
        validation.check(request)
    status = to_status(raised.value, "mlmesh.test")
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in raised.value.violations] == ["model", "alias", "version", "reason"]
    assert "(and 1 more)" in raised.value.message
    assert "rrrr" not in raised.value.message  # the rules describe, never echo, a value
    assert code_pb2.INVALID_ARGUMENT == 3


class Settings(ServiceSettings):
    service_name: ClassVar[str] = "validation-test"


class Double(registry_service_pb2_grpc.RegistryServiceServicer):
    def __init__(self) -> None:
        self.calls = 0
        self.chunks = 0

    async def GetModel(self, request, context):
        self.calls += 1
        return rpc.GetModelResponse(model=model_pb2.Model(name=request.name))

    async def UploadModelVersion(self, request_iterator, context):
        async for message in request_iterator:
            self.chunks += message.WhichOneof("content") == "chunk"
        return rpc.UploadModelVersionResponse()


@pytest.fixture
async def served():
    double = Double()

    def register(server):
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(double, server)
        return ["mlmesh.registry.v1.RegistryService"]

    view = KeyView()
    caller, secret = directory_key([gateway_pb2.PLATFORM_SERVICE_REGISTRY])
    view.replace([caller], 1)
    settings = Settings(port=0, metrics_port=0, drain_seconds=0)
    host = await start_service(settings, register, error_domain="mlmesh.test", key_view=view)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        yield double, registry_service_pb2_grpc.RegistryServiceStub(channel), secret
    await host.shutdown()


async def test_a_bad_request_never_reaches_the_handler(served):
    double, stub, secret = served
    key = bearer_metadata(secret)
    details = await expect_error(
        stub.GetModel(rpc.GetModelRequest(name="Not A Name"), metadata=key),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.error_info.reason == "INVALID_ARGUMENT"
    assert [v.field for v in details.bad_request.field_violations] == ["name"]
    assert double.calls == 0
    reply = await stub.GetModel(rpc.GetModelRequest(name="good-name"), metadata=key)
    assert reply.model.name == "good-name" and double.calls == 1
    # No key: the key check answers before the rules are read.
    await expect_error(
        stub.GetModel(rpc.GetModelRequest(name="Not A Name")), grpc.StatusCode.UNAUTHENTICATED
    )


async def test_each_message_of_a_client_stream_is_checked(served):
    double, stub, secret = served
    header = rpc.UploadHeader(model="m-1", sha256="0" * 64, size_bytes=2)
    messages = [
        rpc.UploadModelVersionRequest(header=header),
        rpc.UploadModelVersionRequest(chunk=b"ab"),
        rpc.UploadModelVersionRequest(chunk=b""),  # a chunk is 1 byte to 4 MiB
    ]
    details = await expect_error(
        stub.UploadModelVersion(iter(messages), metadata=bearer_metadata(secret)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in details.bad_request.field_violations] == ["chunk"]
    assert double.chunks == 1  # the good chunk arrived; the bad one never did


async def test_a_large_request_is_checked_off_the_event_loop(monkeypatch):
    threads = []
    real = validation.check

    def recording(request):
        import threading

        threads.append(threading.current_thread().name)
        real(request)

    monkeypatch.setattr(validation, "check", recording)
    await validation.check_async(rpc.UploadModelVersionRequest(chunk=b"x" * (1 << 20)))
    await validation.check_async(rpc.GetModelRequest(name="small"))
    assert threads[0] != "MainThread" and threads[1] == "MainThread"

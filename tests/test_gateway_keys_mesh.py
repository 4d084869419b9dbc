"""One key for every route: Envoy asks the gateway (ext_authz) on each call."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import grpc
import pytest
from google.protobuf import duration_pb2
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as gateway_rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, key_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh.llm.v1 import llm_pb2, llm_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh.registry.v1 import registry_service_pb2 as registry_rpc
from mlmesh.registry.v1 import registry_service_pb2_grpc
from mlmesh_chassis.testing import expect_error
from mlmesh_sdk.channel import mesh_channel

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
MODEL = model_reference_pb2.ModelReference(model="tiny-llama", alias="champion")


@pytest.fixture
async def admin(full_mesh):
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        yield key_service_pb2_grpc.KeyServiceStub(channel)


async def create_key(admin, *services: int, **fields) -> tuple[pb.Key, str]:
    reply = await admin.CreateKey(
        keys_rpc.CreateKeyRequest(
            key=pb.Key(
                display_name="test key", scopes=pb.KeyScopes(services=list(services)), **fields
            )
        )
    )
    return reply.key, reply.secret


def calls(address: str, secret: str):
    """One read on each of three services' routes, with ``secret``."""

    async def run(code: grpc.StatusCode | None) -> None:
        async with mesh_channel(address, secret) as channel:
            registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
            llm = llm_service_pb2_grpc.LlmServiceStub(channel)
            keys = key_service_pb2_grpc.KeyServiceStub(channel)
            for call in (
                registry.ListModels(registry_rpc.ListModelsRequest()),
                llm.CountTokens(llm_rpc.CountTokensRequest(model=MODEL, text="hi")),
                keys.ListKeys(keys_rpc.ListKeysRequest()),
            ):
                if code is None:
                    await call
                else:
                    details = await expect_error(call, code)
                    assert details.error_info.domain == "mlmesh.gateway"

    return run


async def test_no_key_or_a_wrong_key_is_unauthenticated_everywhere(full_mesh):
    await calls(full_mesh.address, "")(UNAUTHENTICATED)
    await calls(full_mesh.address, "mlm_0123456789abcdef_" + "x" * 32)(UNAUTHENTICATED)
    await calls(full_mesh.address, "not-a-key")(UNAUTHENTICATED)


async def test_scopes_decide_which_routes_a_key_may_use(admin, full_mesh):
    _, secret = await create_key(admin, pb.PLATFORM_SERVICE_REGISTRY)
    async with mesh_channel(full_mesh.address, secret) as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await registry.ListModels(registry_rpc.ListModelsRequest())
        llm = llm_service_pb2_grpc.LlmServiceStub(channel)
        details = await expect_error(
            llm.CountTokens(llm_rpc.CountTokensRequest(model=MODEL, text="hi")), DENIED
        )
        assert details.error_info.reason == "PERMISSION_DENIED"
        assert details.error_info.metadata["service"] == "ADMIN"
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        await expect_error(keys.ListKeys(keys_rpc.ListKeysRequest()), DENIED)
    # a key created with no services gets the model-serving ones
    key, secret = await create_key(admin)
    assert set(key.scopes.services) == {
        pb.PLATFORM_SERVICE_GENERATE,
        pb.PLATFORM_SERVICE_INFER,
        pb.PLATFORM_SERVICE_EMBED,
    }
    async with mesh_channel(full_mesh.address, secret) as channel:
        # Models are served only through the gateway: the llm service's own
        # route (the gateway's backend, no limits, no usage) is for admins.
        llm = llm_service_pb2_grpc.LlmServiceStub(channel)
        details = await expect_error(
            llm.CountTokens(llm_rpc.CountTokensRequest(model=MODEL, text="hi")), DENIED
        )
        assert details.error_info.metadata["service"] == "ADMIN"
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        request = gateway_rpc.GenerateRequest(
            request=llm_rpc.GenerateRequest(
                model=MODEL, text="hi", sampling=llm_pb2.SamplingParams(max_tokens=2)
            )
        )
        chunks = [chunk async for chunk in gateway.Generate(request)]
        assert sum(chunk.response.token_count for chunk in chunks) == 2


async def test_a_revoked_key_stops_working_within_one_second(admin, full_mesh):
    key, secret = await create_key(admin, pb.PLATFORM_SERVICE_REGISTRY)
    async with mesh_channel(full_mesh.address, secret) as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await registry.ListModels(registry_rpc.ListModelsRequest())
        await admin.RevokeKey(keys_rpc.RevokeKeyRequest(id=key.id, reason="leaked"))
        revoked_at = time.monotonic()
        while True:
            try:
                await registry.ListModels(registry_rpc.ListModelsRequest())
            except grpc.RpcError as error:
                assert error.code() == UNAUTHENTICATED
                break
            await asyncio.sleep(0.05)
        assert time.monotonic() - revoked_at < 1.0
        details = await expect_error(
            registry.ListModels(registry_rpc.ListModelsRequest()), UNAUTHENTICATED
        )
        assert details.error_info.metadata["key_id"] == key.id


async def test_rotation_keeps_the_old_secret_for_the_grace_period(admin, full_mesh):
    key, old = await create_key(admin, pb.PLATFORM_SERVICE_REGISTRY)
    rotated = await admin.RotateKey(
        keys_rpc.RotateKeyRequest(id=key.id, grace_period=duration_pb2.Duration(seconds=2))
    )
    assert rotated.key.id == key.id and rotated.secret != old
    await calls_registry(full_mesh.address, old)
    await calls_registry(full_mesh.address, rotated.secret)
    await asyncio.sleep(2.6)
    with pytest.raises(grpc.RpcError) as expired:
        await calls_registry(full_mesh.address, old)
    assert expired.value.code() == UNAUTHENTICATED
    await calls_registry(full_mesh.address, rotated.secret)


async def calls_registry(address: str, secret: str) -> None:
    async with mesh_channel(address, secret) as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await registry.ListModels(registry_rpc.ListModelsRequest())


async def test_keys_are_stored_only_as_keyed_hashes(admin, full_mesh):
    key, secret = await create_key(admin, pb.PLATFORM_SERVICE_REGISTRY)
    listed = await admin.ListKeys(keys_rpc.ListKeysRequest())
    assert key.id in [k.id for k in listed.keys]
    assert all(k.secret_prefix.startswith("mlm_") for k in listed.keys)
    database = sqlite3.connect(full_mesh.state_dir / "gateway.db")
    try:
        rows = database.execute("SELECT * FROM api_keys WHERE id = ?", (key.id,)).fetchall()
    finally:
        database.close()
    stored = repr(rows)
    assert secret not in stored and secret.split("_", 2)[2] not in stored
    details = await expect_error(
        admin.CreateKey(keys_rpc.CreateKeyRequest(key=pb.Key())), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details.bad_request.field_violations[0].field == "key.display_name"

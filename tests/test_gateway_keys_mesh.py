"""One key for every route, checked by every service itself, in process: through
Envoy and straight to each service's port alike (a port is no trust boundary)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import stat
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from meshkit import usage_buckets
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.deployer.v1alpha1 import deployer_service_pb2, deployer_service_pb2_grpc
from mlmesh.features.v1 import features_service_pb2, features_service_pb2_grpc
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as gateway_rpc
from mlmesh.gateway.v1 import (
    gateway_service_pb2_grpc,
    key_service_pb2_grpc,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh.llm.v1 import llm_pb2, llm_service_pb2_grpc
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh.registry.v1 import registry_service_pb2 as registry_rpc
from mlmesh.registry.v1 import registry_service_pb2_grpc
from mlmesh_chassis.testing import expect_error
from mlmesh_sdk.channel import mesh_channel
from registry_helpers import upload

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
    """One call on each service's routes, with ``secret``."""

    async def run(code: grpc.StatusCode | None) -> None:
        async with mesh_channel(address, secret) as channel:
            registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
            llm = llm_service_pb2_grpc.LlmServiceStub(channel)
            keys = key_service_pb2_grpc.KeyServiceStub(channel)
            usage = usage_service_pb2_grpc.UsageServiceStub(channel)
            gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
            deployer = deployer_service_pb2_grpc.DeployerServiceStub(channel)
            features = features_service_pb2_grpc.FeatureServiceStub(channel)
            for call in (
                registry.ListModels(registry_rpc.ListModelsRequest()),
                registry.CreateModel(registry_rpc.CreateModelRequest()),
                llm.CountTokens(llm_rpc.CountTokensRequest(model=MODEL, text="hi")),
                keys.ListKeys(keys_rpc.ListKeysRequest()),
                usage.GetUsage(usage_service_pb2.GetUsageRequest()),
                gateway.ListModels(gateway_rpc.ListModelsRequest()),
                deployer.ListDeployments(deployer_service_pb2.ListDeploymentsRequest()),
                features.ListFeatureViews(features_service_pb2.ListFeatureViewsRequest()),
            ):
                if code is None:
                    await call
                else:
                    details = await expect_error(call, code)
                    # UNAUTHENTICATED says why (no key, a bad, revoked or expired one)
                    assert details.error_info.reason == code.name or (
                        code is grpc.StatusCode.UNAUTHENTICATED
                        and details.error_info.reason.startswith("API_KEY_")
                    ), details.error_info.reason

    return run


def direct(mesh, service: str) -> str:
    """A service's own port, bypassing Envoy."""
    return f"127.0.0.1:{mesh.port(service)}"


async def test_no_key_or_a_wrong_key_is_unauthenticated_everywhere(full_mesh):
    for secret in ("", "mlm_0123456789abcdef_" + "x" * 32, "not-a-key", "x" * 4000):
        await calls(full_mesh.address, secret)(UNAUTHENTICATED)


# Methods each service's own port serves: a probe a service does not serve
# would answer UNIMPLEMENTED and prove nothing about its key check.
SERVED_ON_PORT = {
    "registry": [
        ("/mlmesh.registry.v1.RegistryService/ListModels", registry_rpc.ListModelsRequest()),
    ],
    "llm": [
        (
            "/mlmesh.llm.v1.LlmService/CountTokens",
            llm_rpc.CountTokensRequest(model=MODEL, text="probe"),
        ),
    ],
    "gateway": [
        (
            "/mlmesh.gateway.v1.UsageService/GetUsage",
            usage_service_pb2.GetUsageRequest(
                start_time=timestamp_pb2.Timestamp(seconds=0),
                end_time=timestamp_pb2.Timestamp(seconds=3600),
            ),
        ),
        ("/mlmesh.gateway.v1.KeyService/ListKeys", keys_rpc.ListKeysRequest()),
    ],
    "deployer": [
        (
            "/mlmesh.deployer.v1alpha1.DeployerService/ListDeployments",
            deployer_service_pb2.ListDeploymentsRequest(),
        ),
    ],
    "features": [
        (
            "/mlmesh.features.v1.FeatureService/ListFeatureViews",
            features_service_pb2.ListFeatureViewsRequest(),
        ),
    ],
}


async def test_straight_calls_to_every_service_port_need_a_key(full_mesh):
    made_up = "mlm_0123456789abcdef_" + "x" * 32
    for service, methods in SERVED_ON_PORT.items():
        for secret in ("", made_up):
            async with mesh_channel(direct(full_mesh, service), secret) as channel:
                for method, request in methods:
                    call = channel.unary_unary(
                        method,
                        request_serializer=type(request).SerializeToString,
                        response_deserializer=lambda b: b,
                    )
                    details = await expect_error(call(request, timeout=5), UNAUTHENTICATED)
                    reason = "API_KEY_INVALID" if secret else "API_KEY_MISSING"
                    assert details.error_info.reason == reason, (service, method)
    # With the admin key the same probes are answered: the refusals above are
    # the key check, not a method the port does not serve.
    for service, methods in SERVED_ON_PORT.items():
        async with mesh_channel(direct(full_mesh, service), full_mesh.api_key) as channel:
            for method, request in methods:
                call = channel.unary_unary(
                    method,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=lambda b: b,
                )
                await call(request, timeout=5)


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
        assert details.error_info.metadata["service"] == "LLM"
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        await expect_error(keys.ListKeys(keys_rpc.ListKeysRequest()), DENIED)
        # Any key reads its own usage; another key's needs ADMIN.
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        hour_ago = timestamp_pb2.Timestamp(seconds=int(time.time()) - 3600)
        await usage.GetUsage(usage_service_pb2.GetUsageRequest(start_time=hour_ago))
        other, _ = await create_key(admin)
        asked = usage_service_pb2.GetUsageRequest(start_time=hour_ago, key_ids=[other.id])
        details = await expect_error(usage.GetUsage(asked), DENIED)
        assert details.error_info.metadata["service"] == "ADMIN"
    # a key created with no services gets the model-serving ones
    key, secret = await create_key(admin)
    assert set(key.scopes.services) == {
        pb.PLATFORM_SERVICE_GENERATE,
        pb.PLATFORM_SERVICE_INFER,
        pb.PLATFORM_SERVICE_EMBED,
    }
    async with mesh_channel(full_mesh.address, secret) as channel:
        # Models are served only through the gateway: the llm service (the
        # gateway's backend, no limits, no usage) takes the gateway's own key.
        llm = llm_service_pb2_grpc.LlmServiceStub(channel)
        details = await expect_error(
            llm.CountTokens(llm_rpc.CountTokensRequest(model=MODEL, text="hi")), DENIED
        )
        assert details.error_info.metadata["service"] == "LLM"
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        request = gateway_rpc.GenerateRequest(
            request=llm_rpc.GenerateRequest(
                model=MODEL, text="hi", sampling=llm_pb2.SamplingParams(max_tokens=2)
            )
        )
        chunks = [chunk async for chunk in gateway.Generate(request)]
        assert sum(chunk.response.token_count for chunk in chunks) == 2


async def _refused_within(call, limit_s: float) -> float:
    """Seconds until ``call()`` fails UNAUTHENTICATED (asserts under limit_s)."""
    start = time.monotonic()
    while True:
        try:
            await call()
        except grpc.RpcError as error:
            assert error.code() == UNAUTHENTICATED, error
            break
        assert time.monotonic() - start < limit_s
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_a_revoked_key_stops_working_everywhere_and_its_streams_end(admin, full_mesh):
    key, secret = await create_key(admin, pb.PLATFORM_SERVICE_REGISTRY)
    async with (
        mesh_channel(full_mesh.address, secret) as front,
        mesh_channel(direct(full_mesh, "registry"), secret) as straight,
    ):
        registry = registry_service_pb2_grpc.RegistryServiceStub(front)
        registry_direct = registry_service_pb2_grpc.RegistryServiceStub(straight)
        await registry.ListModels(registry_rpc.ListModelsRequest())
        # open streams: events straight from the registry and through Envoy
        # (a Generate stream: tests/test_gateway_routing_mesh.py)
        events = registry_direct.WatchEvents(registry_rpc.WatchEventsRequest())
        front_events = registry.WatchEvents(registry_rpc.WatchEventsRequest())
        await asyncio.sleep(0.2)
        await admin.RevokeKey(keys_rpc.RevokeKeyRequest(id=key.id, reason="leaked"))
        revoked_at = time.monotonic()
        for stub in (registry, registry_direct):
            took = await _refused_within(
                lambda stub=stub: stub.ListModels(registry_rpc.ListModelsRequest()), 1.0
            )
            assert took < 1.0
        for stream in (events, front_events):
            with pytest.raises(grpc.RpcError) as ended:
                while await stream.read() is not grpc.aio.EOF:
                    pass
            assert ended.value.code() == UNAUTHENTICATED, ended.value
            assert "revoked" in ended.value.details()
        assert time.monotonic() - revoked_at < 1.5
        details = await expect_error(
            registry.ListModels(registry_rpc.ListModelsRequest()), UNAUTHENTICATED
        )
        assert details.error_info.metadata["key_id"] == key.id


async def test_the_actor_in_alias_history_is_the_verified_key_never_a_header(
    admin, full_mesh, unique
):
    key, secret = await create_key(admin, pb.PLATFORM_SERVICE_REGISTRY)
    spoof = (("x-mlmesh-actor", "key:someone-else"), ("x-mlmesh-key-id", "0" * 16))
    for address in (full_mesh.address, direct(full_mesh, "registry")):
        async with mesh_channel(address, secret) as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            if address == full_mesh.address:
                await upload(stub, unique, b"weights")
            await stub.SetAlias(
                registry_rpc.SetAliasRequest(model=unique, alias="prod", version=1),
                metadata=spoof,
            )
            await stub.DeleteAlias(
                registry_rpc.DeleteAliasRequest(model=unique, alias="prod"), metadata=spoof
            )
            history = await stub.ListAliasHistory(
                registry_rpc.ListAliasHistoryRequest(model=unique, alias="prod")
            )
    actors = {event.actor for event in history.events}
    assert actors == {f"key:{key.id}"}, actors


async def _create_key_once_the_gateway_is_back(admin) -> keys_rpc.CreateKeyResponse:
    """The runner restarts a killed gateway on the same port: a registry key
    created as soon as it answers again."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await admin.CreateKey(
                keys_rpc.CreateKeyRequest(
                    key=pb.Key(
                        display_name="after",
                        scopes=pb.KeyScopes(services=[pb.PLATFORM_SERVICE_REGISTRY]),
                    )
                ),
                timeout=2,
            )
        except grpc.RpcError:
            assert time.monotonic() < deadline, "the gateway did not come back"
            await asyncio.sleep(0.2)


async def test_the_gateway_away_services_keep_serving_and_new_keys_arrive_on_return(
    admin, full_mesh
):
    _, secret = await create_key(admin, pb.PLATFORM_SERVICE_REGISTRY)
    # The key reaches the registry's view through the gateway's watch stream:
    # wait until it has (milliseconds, longer on a loaded machine), then take
    # the gateway away.
    async with mesh_channel(direct(full_mesh, "registry"), secret) as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        async with asyncio.timeout(30):
            while True:
                try:
                    await registry.ListModels(registry_rpc.ListModelsRequest())
                    break
                except grpc.RpcError as error:
                    assert error.code() == UNAUTHENTICATED, error
                    await asyncio.sleep(0.1)
    ready = json.loads((full_mesh.state_dir / "ready.json").read_text())
    os.kill(int(ready["services"]["gateway"]["pid"]), signal.SIGKILL)
    try:
        async with mesh_channel(direct(full_mesh, "registry"), secret) as channel:
            registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
            await registry.ListModels(registry_rpc.ListModelsRequest())  # from its view
    finally:
        # Whatever happened above, the gateway is back before the next test.
        reply = await _create_key_once_the_gateway_is_back(admin)
    created = time.monotonic()
    async with mesh_channel(direct(full_mesh, "registry"), reply.secret) as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        while True:
            try:
                await registry.ListModels(registry_rpc.ListModelsRequest())
                break
            except grpc.RpcError as error:
                assert error.code() == UNAUTHENTICATED
                assert time.monotonic() - created < 1.0, "a new key took over a second"
                await asyncio.sleep(0.02)


async def test_ready_file_holds_no_secret_and_key_files_are_private(full_mesh):
    ready = (full_mesh.state_dir / "ready.json").read_text()
    assert full_mesh.api_key not in ready and "mlm_" not in ready
    described = json.loads(ready)
    admin_file = Path(described["admin_key_file"])
    assert stat.S_IMODE(admin_file.stat().st_mode) == 0o600
    secrets = full_mesh.state_dir / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for path in secrets.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


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


async def test_keys_are_stored_only_as_hashes(admin, full_mesh):
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
    assert hashlib.sha256(secret.encode()).hexdigest() in stored
    details = await expect_error(
        admin.CreateKey(keys_rpc.CreateKeyRequest(key=pb.Key())), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details.bad_request.field_violations[0].field == "key.display_name"


async def _usage_requests(full_mesh, key_id: str, service: int, at_least: int) -> int:
    """The requests the gateway's ledger holds for ``key_id`` on ``service``,
    once at least ``at_least`` have arrived (usage is batched off the path)."""
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)
        deadline = time.monotonic() + 10
        while True:
            buckets = [b for b in await usage_buckets(usage, key_id) if b.service == service]
            count = sum(b.request_count for b in buckets)
            if count >= at_least:
                return count
            assert time.monotonic() < deadline, buckets
            await asyncio.sleep(0.2)


async def test_the_registry_meters_its_callers_per_key(admin, full_mesh):
    key, secret = await create_key(
        admin, pb.PLATFORM_SERVICE_REGISTRY, limits=pb.KeyLimits(requests_per_minute=5)
    )
    async with (
        mesh_channel(full_mesh.address, secret) as front,
        mesh_channel(direct(full_mesh, "registry"), secret) as straight,
    ):
        stubs = [registry_service_pb2_grpc.RegistryServiceStub(c) for c in (front, straight)]
        for i in range(5):  # through Envoy and straight to the port: one budget
            await stubs[i % 2].ListModels(registry_rpc.ListModelsRequest())
        details = await expect_error(
            stubs[1].ListModels(registry_rpc.ListModelsRequest()),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert details.quota_failure is not None and details.retry_info is not None
    # One usage event per admitted call, in the gateway's ledger.
    assert await _usage_requests(full_mesh, key.id, pb.PLATFORM_SERVICE_REGISTRY, 5) == 5


async def test_the_llm_the_deployer_and_features_meter_their_callers_too(admin, full_mesh):
    """Straight to their ports (no gateway in the path): per-key requests per
    minute, and one usage event per admitted call in the one ledger."""
    key, secret = await create_key(
        admin,
        pb.PLATFORM_SERVICE_LLM,
        pb.PLATFORM_SERVICE_DEPLOYER,
        pb.PLATFORM_SERVICE_FEATURES,
        limits=pb.KeyLimits(requests_per_minute=2),
    )
    probes = {
        "llm": (
            pb.PLATFORM_SERVICE_LLM,
            lambda channel: llm_service_pb2_grpc.LlmServiceStub(channel).CountTokens(
                llm_rpc.CountTokensRequest(model=MODEL, text="metered")
            ),
        ),
        "deployer": (
            pb.PLATFORM_SERVICE_DEPLOYER,
            lambda channel: deployer_service_pb2_grpc.DeployerServiceStub(channel).ListDeployments(
                deployer_service_pb2.ListDeploymentsRequest()
            ),
        ),
        "features": (
            pb.PLATFORM_SERVICE_FEATURES,
            lambda channel: features_service_pb2_grpc.FeatureServiceStub(channel).ListFeatureViews(
                features_service_pb2.ListFeatureViewsRequest()
            ),
        ),
    }
    for service, (_, call) in probes.items():
        async with mesh_channel(direct(full_mesh, service), secret) as channel:
            for _ in range(2):
                await call(channel)
            details = await expect_error(call(channel), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert details.quota_failure is not None, service
    for service, (platform_service, _) in probes.items():
        assert await _usage_requests(full_mesh, key.id, platform_service, 2) == 2, service

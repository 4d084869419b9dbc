"""The gateway's one API through Envoy: Generate, Infer, Embed, usage, limits."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid

import grpc
import numpy as np
import pytest
from meshkit import generate_request, usage_buckets
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.deployer.v1alpha1 import deployer_service_pb2 as deployer_rpc
from mlmesh.deployer.v1alpha1 import deployer_service_pb2_grpc
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, key_service_pb2_grpc, usage_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh.registry.v1 import model_pb2
from mlmesh.registry.v1 import registry_service_pb2 as registry_rpc
from mlmesh_chassis.testing import expect_error
from mlmesh_sdk.channel import mesh_channel
from mlmesh_sdk.registry import RegistryClient
from mlmesh_triton.build import build_digits, digits_training_data, train_digits

LLM = model_reference_pb2.ModelReference(model="tiny-llama", alias="champion")
pytestmark = pytest.mark.timeout(400)


@pytest.fixture
async def admin(full_mesh):
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        yield (
            key_service_pb2_grpc.KeyServiceStub(channel),
            usage_service_pb2_grpc.UsageServiceStub(channel),
        )


async def new_key(admin, **fields) -> str:
    keys, _ = admin
    fields.setdefault(
        "scopes",
        pb.KeyScopes(
            services=[
                pb.PLATFORM_SERVICE_GENERATE,
                pb.PLATFORM_SERVICE_INFER,
                pb.PLATFORM_SERVICE_EMBED,
            ]
        ),
    )
    reply = await keys.CreateKey(keys_rpc.CreateKeyRequest(key=pb.Key(display_name="t", **fields)))
    return reply.secret


generate = generate_request


async def usage_of(admin, key_id: str) -> list[pb.UsageBucket]:
    _, usage = admin
    return await usage_buckets(usage, key_id)


async def test_generate_relays_the_stream_and_bills_every_call(admin, full_mesh):
    secret = await new_key(admin)
    key_id = secret.split("_")[1]
    async with mesh_channel(full_mesh.address, secret) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        chunks = [
            c async for c in gateway.Generate(generate(max_tokens=12, seed=3, request_id="req-1"))
        ]
        # the same request id again: a second call, billed as one
        again = [
            c async for c in gateway.Generate(generate(max_tokens=12, seed=3, request_id="req-1"))
        ]
    streamed = sum(c.response.token_count for c in chunks)
    assert chunks[0].region == "local" and chunks[0].response.model.version >= 1
    assert chunks[-1].response.usage.completion_tokens == streamed
    assert not chunks[-1].response.HasField("load")  # internal to the balancer
    assert sum(c.response.token_count for c in again) == streamed
    buckets = await usage_of(admin, key_id)
    assert [b.request_count for b in buckets] == [2]
    assert buckets[0].usage.completion_tokens == 2 * streamed
    assert buckets[0].usage.prompt_tokens == 2 * chunks[-1].response.usage.prompt_tokens


async def test_reusing_a_request_id_dodges_neither_limits_nor_billing(admin, full_mesh):
    """Ten Generate calls reusing one request_id on a 3000 tokens/min key: at
    most the limit admitted, and every admitted call billed (to its key)."""
    secret = await new_key(admin, limits=pb.KeyLimits(tokens_per_minute=3000))
    key_id = secret.split("_")[1]
    admitted, streamed = 0, 0
    async with mesh_channel(full_mesh.address, secret) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        for _ in range(10):
            try:
                chunks = [
                    c
                    async for c in gateway.Generate(
                        generate(max_tokens=1000, temperature=0.0, request_id="reused")
                    )
                ]
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                continue
            admitted += 1
            streamed += sum(c.response.token_count for c in chunks)
    buckets = await usage_of(admin, key_id)
    assert admitted >= 1 and sum(b.request_count for b in buckets) == admitted
    assert sum(b.usage.completion_tokens for b in buckets) == streamed
    # Reservations (prompt + 1000) settle to what was used: what the key was
    # admitted to use in the minute, all of it billed, fits the limit.
    billed = sum(b.usage.prompt_tokens + b.usage.completion_tokens for b in buckets)
    assert billed <= 3000
    if streamed > 900 * admitted:  # the model used most of each reservation
        assert admitted <= 2
    # A second key reusing the first key's id is billed its own call.
    other = await new_key(admin)
    async with mesh_channel(full_mesh.address, other) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        mine = [c async for c in gateway.Generate(generate(max_tokens=5, request_id="reused"))]
    theirs = await usage_of(admin, other.split("_")[1])
    assert [b.request_count for b in theirs] == [1]
    assert theirs[0].usage.completion_tokens == sum(c.response.token_count for c in mine)
    assert sum(b.request_count for b in await usage_of(admin, key_id)) == admitted


async def test_token_limit_rejects_with_quota_failure_and_retry_info(admin, full_mesh):
    secret = await new_key(admin, limits=pb.KeyLimits(tokens_per_minute=150))
    async with mesh_channel(full_mesh.address, secret) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        [c async for c in gateway.Generate(generate(max_tokens=100, temperature=0.0))]
        details = await expect_error(
            _drain(gateway.Generate(generate(max_tokens=100, temperature=0.0))),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    assert details.error_info.reason == "QUOTA_EXCEEDED"
    assert details.quota_failure.violations[0].description == "tokens_per_minute"
    delay = details.retry_info.retry_delay.ToTimedelta().total_seconds()
    assert 0 < delay <= 60


async def _drain(call) -> None:
    async for _ in call:
        pass


async def test_model_scopes_and_backend_errors_pass_through(admin, full_mesh):
    secret = await new_key(
        admin,
        scopes=pb.KeyScopes(services=[pb.PLATFORM_SERVICE_GENERATE], model_patterns=["digits*"]),
    )
    async with mesh_channel(full_mesh.address, secret) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        details = await expect_error(
            _drain(gateway.Generate(generate(max_tokens=4))), grpc.StatusCode.PERMISSION_DENIED
        )
        assert details.error_info.metadata["model"] == "tiny-llama"
    secret = await new_key(admin)
    async with mesh_channel(full_mesh.address, secret) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        details = await expect_error(
            # Valid by the contract (max_tokens >= 1, the gateway's own check), but
            # more than tiny-llama's 1024-token context: only the llm can say so.
            _drain(gateway.Generate(generate(max_tokens=5000))),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details.error_info.domain == "mlmesh.llm"  # the llm's own details, relayed
        assert details.error_info.metadata["context_length"] == "1024"
        assert details.bad_request.field_violations[0].field == "sampling.max_tokens"


async def test_infer_and_embed_reach_triton(admin, full_mesh):
    secret = await new_key(admin)
    x, y = digits_training_data()
    async with mesh_channel(full_mesh.address, secret) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        reply = await gateway.Infer(
            rpc.InferRequest(
                model=model_reference_pb2.ModelReference(model="digits", alias="champion"),
                inputs=[
                    pb.InferTensor(
                        name="pixels",
                        datatype="FP32",
                        shape=[4, 64],
                        raw_contents=x[:4].astype(np.float32).tobytes(),
                    )
                ],
            )
        )
        probabilities = np.frombuffer(reply.outputs[0].raw_contents, dtype=np.float32)
        probabilities = probabilities.reshape(reply.outputs[0].shape)
        assert list(probabilities.argmax(axis=1)) == list(y[:4])
        assert reply.usage.input_items == 4 * 64
        details = await expect_error(
            gateway.Infer(
                rpc.InferRequest(
                    model=model_reference_pb2.ModelReference(model="digits"),
                    inputs=[
                        pb.InferTensor(
                            name="pixels",
                            datatype="FP32",
                            shape=[1, 63],
                            raw_contents=x[:1, :63].astype(np.float32).tobytes(),
                        )
                    ],
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details.bad_request.field_violations[0].field == "inputs['pixels'].shape"
        embedded = await gateway.Embed(
            rpc.EmbedRequest(
                model=model_reference_pb2.ModelReference(model="minilm"),
                texts=["a mesh of services", "one key for every model"],
            )
        )
        assert embedded.dimension == 384 and len(embedded.embeddings) == 2
        # The contract's rules, checked before anything is reserved: no texts,
        # a text past 64 KiB, a model name with a trailing newline.
        for bad, field in (
            (rpc.EmbedRequest(model=model_reference_pb2.ModelReference(model="minilm")), "texts"),
            (
                rpc.EmbedRequest(
                    model=model_reference_pb2.ModelReference(model="minilm"),
                    texts=["ok", "x" * (64 * 1024 + 1)],
                ),
                "texts[1]",
            ),
            (
                rpc.EmbedRequest(
                    model=model_reference_pb2.ModelReference(model="minilm\n"), texts=["a"]
                ),
                "model.model",
            ),
        ):
            details = await expect_error(gateway.Embed(bad), grpc.StatusCode.INVALID_ARGUMENT)
            assert [v.field for v in details.bad_request.field_violations] == [field]
        listed = await gateway.ListModels(rpc.ListModelsRequest(kind=pb.MODEL_KIND_LLM))
        # The llm's model, and the same model behind vLLM's own server.
        assert [(m.model, m.backend) for m in listed.models] == [
            ("tiny-llama", pb.MODEL_BACKEND_LLM_SERVICE),
            ("tiny-llama-vllm", pb.MODEL_BACKEND_OPENAI_COMPATIBLE),
        ]


async def deployer_experiment_versions(mesh) -> list[int]:
    async with mesh_channel(mesh.address, mesh.api_key) as channel:
        stub = deployer_service_pb2_grpc.DeployerServiceStub(channel)
        reply = await stub.ListDeployments(deployer_rpc.ListDeploymentsRequest())
    digits = next(d for d in reply.deployments if d.triton_model == "digits")
    return list(digits.experiment_versions)


async def wait_for(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.5)


async def test_ab_split_is_sticky_and_shadow_disagreements_are_recorded(admin, full_mesh, tmp_path):
    x, _ = digits_training_data()
    # the sample on which the two versions disagree most, for the shadow check
    gap = np.abs(train_digits(1.0).predict_proba(x) - train_digits(0.05).predict_proba(x))
    sample = x[int(gap.max(axis=1).argmax())][None]
    folder = await asyncio.to_thread(build_digits, tmp_path / "digits-ab", c=0.05)
    name = f"ab-{uuid.uuid4().hex[:8]}"
    async with RegistryClient(full_mesh.address, api_key=full_mesh.api_key) as registry:
        control = (await registry.resolve("digits@champion")).version
        treatment = (await registry.upload_folder("digits", folder, format="triton")).version
        await registry.stub.CreateExperiment(
            registry_rpc.CreateExperimentRequest(
                experiment=model_pb2.Experiment(
                    name=name,
                    model="digits",
                    arms=[
                        model_pb2.ExperimentArm(name="control", version=control, weight=50),
                        model_pb2.ExperimentArm(name="treatment", version=treatment, weight=50),
                    ],
                    shadow=model_pb2.ShadowTraffic(version=treatment, percent=100),
                )
            ),
            metadata=registry.metadata,
        )
        try:
            await wait_for(lambda: _has(full_mesh, treatment))
            # The gateway follows experiments through the registry's watch, and
            # remembers whether an arm is loaded for up to 1 s (ready_ttl_s).
            await asyncio.sleep(1.5)
            seen: dict[str, set[int]] = {}
            for _ in range(16):
                secret = await new_key(admin)
                async with mesh_channel(full_mesh.address, secret) as channel:
                    gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
                    for _ in range(3):
                        reply = await gateway.Infer(
                            rpc.InferRequest(
                                model=model_reference_pb2.ModelReference(model="digits"),
                                inputs=[
                                    pb.InferTensor(
                                        name="pixels",
                                        datatype="FP32",
                                        shape=[1, 64],
                                        raw_contents=sample.astype(np.float32).tobytes(),
                                    )
                                ],
                            )
                        )
                        seen.setdefault(secret, set()).add(reply.model.version)
            assert all(len(versions) == 1 for versions in seen.values())  # sticky per key
            served = set().union(*seen.values())
            assert served == {control, treatment}  # both arms get traffic
            await asyncio.sleep(1.0)  # shadows run off the callers' path
            database = sqlite3.connect(full_mesh.state_dir / "gateway.db")
            try:
                rows = database.execute(
                    "SELECT primary_version, shadow_version, agreed FROM shadow_results "
                    "WHERE experiment = ?",
                    (name,),
                ).fetchall()
            finally:
                database.close()
            assert rows and all(row[:2] == (control, treatment) for row in rows)
            assert not any(row[2] for row in rows)  # C=1.0 and C=0.05 disagree here
        finally:
            await registry.stub.StopExperiment(
                registry_rpc.StopExperimentRequest(name=name), metadata=registry.metadata
            )
            # the deployer unloads the experiment's version again
            await wait_for(lambda: _lacks(full_mesh, treatment))


async def _has(mesh, version: int) -> bool:
    return version in await deployer_experiment_versions(mesh)


async def _lacks(mesh, version: int) -> bool:
    return version not in await deployer_experiment_versions(mesh)


async def test_token_quota_per_period_reads_the_ledger(admin, full_mesh):
    secret = await new_key(
        admin, limits=pb.KeyLimits(token_quota=60, token_quota_period=pb.QUOTA_PERIOD_DAY)
    )
    async with mesh_channel(full_mesh.address, secret) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        used = 0
        while True:
            try:
                chunks = [c async for c in gateway.Generate(generate(max_tokens=20))]
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                break
            final = chunks[-1].response.usage
            used += final.prompt_tokens + final.completion_tokens
            assert used <= 60
        details = await expect_error(
            _drain(gateway.Generate(generate(max_tokens=20))), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
    assert details.quota_failure.violations[0].description == "token_quota"
    seconds = details.retry_info.retry_delay.ToTimedelta().total_seconds()
    assert 0 < seconds <= 86400  # until the day ends (UTC)
    assert int(details.error_info.metadata["used"]) == used


async def test_llm_ab_split_and_shadow(admin, full_mesh, tmp_path):
    from mlmesh.llm.v1 import llm_service_pb2_grpc
    from mlmesh_llm.tiny_model import build

    folder = await asyncio.to_thread(build, tmp_path / "tiny-ab", seed=2)
    name = f"llm-ab-{uuid.uuid4().hex[:8]}"
    async with (
        RegistryClient(full_mesh.address, api_key=full_mesh.api_key) as registry,
        mesh_channel(full_mesh.address, full_mesh.api_key) as channel,
    ):
        llm = llm_service_pb2_grpc.LlmServiceStub(channel)
        control = (await registry.resolve("tiny-llama@champion")).version
        treatment = (
            await registry.upload_folder("tiny-llama", folder, format="hf-causal-lm")
        ).version
        await registry.stub.CreateExperiment(
            registry_rpc.CreateExperimentRequest(
                experiment=model_pb2.Experiment(
                    name=name,
                    model="tiny-llama",
                    arms=[
                        model_pb2.ExperimentArm(name="control", version=control, weight=50),
                        model_pb2.ExperimentArm(name="treatment", version=treatment, weight=50),
                    ],
                    shadow=model_pb2.ShadowTraffic(version=treatment, percent=100),
                )
            ),
            metadata=registry.metadata,
        )

        async def loaded(version: int) -> bool:
            try:
                await llm.GetModel(
                    llm_rpc.GetModelRequest(
                        model=model_reference_pb2.ModelReference(
                            model="tiny-llama", version=version
                        )
                    )
                )
                return True
            except grpc.RpcError:
                return False

        try:
            await wait_for(lambda: loaded(treatment))
            # The gateway follows experiments through the registry's watch, and
            # remembers whether an arm is loaded for up to 1 s (ready_ttl_s).
            await asyncio.sleep(1.5)
            seen: dict[str, set[int]] = {}
            for _ in range(12):
                secret = await new_key(admin)
                async with mesh_channel(full_mesh.address, secret) as keyed:
                    gateway = gateway_service_pb2_grpc.GatewayServiceStub(keyed)
                    for _ in range(2):
                        chunks = [
                            c
                            async for c in gateway.Generate(
                                generate(max_tokens=8, seed=5, temperature=0.0)
                            )
                        ]
                        seen.setdefault(secret, set()).add(chunks[0].response.model.version)
            assert all(len(versions) == 1 for versions in seen.values())  # sticky per key
            assert set().union(*seen.values()) == {control, treatment}
            await asyncio.sleep(2.0)  # shadows run off the callers' path
            database = sqlite3.connect(full_mesh.state_dir / "gateway.db")
            try:
                rows = database.execute(
                    "SELECT primary_version, shadow_version, agreed FROM shadow_results "
                    "WHERE experiment = ?",
                    (name,),
                ).fetchall()
            finally:
                database.close()
            assert rows and all(row[:2] == (control, treatment) for row in rows)
            assert not any(row[2] for row in rows)  # different weights, different text
        finally:
            await registry.stub.StopExperiment(
                registry_rpc.StopExperimentRequest(name=name), metadata=registry.metadata
            )

            async def unloaded() -> bool:
                return not await loaded(treatment)

            await wait_for(unloaded)


async def test_gateway_routes_check_keys_themselves(full_mesh):
    # Envoy skips ext_authz on GatewayService routes: the gateway must refuse alone.
    for secret in ("", "mlm_0123456789abcdef_" + "x" * 32):
        async with mesh_channel(full_mesh.address, secret) as channel:
            gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
            details = await expect_error(
                _drain(gateway.Generate(generate(max_tokens=2))), grpc.StatusCode.UNAUTHENTICATED
            )
            assert details.error_info.domain == "mlmesh.gateway"
            await expect_error(
                gateway.ListModels(rpc.ListModelsRequest()), grpc.StatusCode.UNAUTHENTICATED
            )

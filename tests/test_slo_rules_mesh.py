"""The SLO rules (deploy/prometheus/rules) on the real mesh's Prometheus
(`mlmesh-run --observe`): after some traffic (Generates, some of them
throttled; Triton inferences; a feature push and read), every rule group
evaluates without error and the recording rules produce the series the
alerts and the dashboard read, read back through Prometheus' HTTP API."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from meshkit import generate_request
from mlmesh.features.v1 import features_pb2, features_service_pb2_grpc
from mlmesh.features.v1 import features_service_pb2 as features_rpc
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, key_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh_inference.triton import TritonClient
from mlmesh_sdk.channel import mesh_channel

pytestmark = pytest.mark.timeout(400)

GATEWAY_GENERATE = "/mlmesh.gateway.v1.GatewayService/Generate"
FEATURES_READ = "/mlmesh.features.v1.FeatureService/GetOnlineFeatures"
# Scrapes and rule evaluations every 2 s in the tests' mesh; the first
# evaluation of a rule group may wait for a whole interval after a scrape.
ARRIVAL_S = 90.0
USER = 987_654  # a user the demo's data does not have


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    reply = _get(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert reply["status"] == "success", reply
    return list(reply["data"]["result"])


async def _create_key(mesh: Any, **limits: int) -> tuple[str, str]:
    async with mesh_channel(mesh.address, mesh.api_key) as channel:
        created = await key_service_pb2_grpc.KeyServiceStub(channel).CreateKey(
            keys_rpc.CreateKeyRequest(
                key=pb.Key(
                    display_name="slo-rules",
                    scopes=pb.KeyScopes(services=[pb.PLATFORM_SERVICE_GENERATE]),
                    limits=pb.KeyLimits(**limits),
                )
            )
        )
    return str(created.key.id), str(created.secret)


async def _traffic(mesh: Any, generate_secret: str, throttled_secret: str) -> None:
    """One round: two Generates, a throttled one (the throttled key allows
    one call a minute: it is refused at least once here), Triton
    inferences, a feature push (fresh) and read."""
    async with mesh_channel(mesh.address, mesh.api_key) as channel:
        features = features_service_pb2_grpc.FeatureServiceStub(channel)
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        user = {"user_id": struct_pb2.Value(number_value=USER)}
        await features.Push(
            features_rpc.PushRequest(
                feature_view="user_last_purchase",
                rows=[
                    features_rpc.PushRow(
                        values={
                            **user,
                            "amount": struct_pb2.Value(number_value=12.5),
                            "category": struct_pb2.Value(string_value="books"),
                            "big_spender": struct_pb2.Value(bool_value=False),
                        },
                        event_time=now,
                    )
                ],
            )
        )
        read = await features.GetOnlineFeatures(
            features_rpc.GetOnlineFeaturesRequest(
                feature_service="fraud_model", entity_rows=[features_pb2.EntityRow(join_keys=user)]
            )
        )
        assert read.rows
    async with mesh_channel(mesh.address, generate_secret) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        for seed in (1, 2):
            async for _ in gateway.Generate(generate_request(max_tokens=4, seed=seed)):
                pass
    refused = 0
    async with mesh_channel(mesh.address, throttled_secret) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        for seed in (3, 4):
            try:
                async for _ in gateway.Generate(generate_request(max_tokens=2, seed=seed)):
                    pass
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                refused += 1
    assert refused >= 1
    async with TritonClient(f"127.0.0.1:{mesh.port('triton')}", attempts=3) as triton:
        for _ in range(3):
            await triton.infer("digits", {"pixels": np.zeros((2, 64), np.float32)})


async def _until_found(prometheus: str, wanted: dict[str, str]) -> dict[str, list[Any]]:
    """Each query's series, once every query has some with a number (not
    NaN); fails after ARRIVAL_S."""
    deadline = time.monotonic() + ARRIVAL_S
    while True:
        found = {
            name: await asyncio.to_thread(_query, prometheus, expr) for name, expr in wanted.items()
        }
        missing = sorted(
            name
            for name, series in found.items()
            if not series or any(s["value"][1] == "NaN" for s in series)
        )
        if not missing:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no series (or NaN) for {missing} after {ARRIVAL_S:.0f} s")
        await asyncio.sleep(2.0)


async def test_recording_rules_produce_the_slo_series(full_mesh: Any) -> None:
    ready = json.loads((Path(full_mesh.state_dir) / "ready.json").read_text())
    prometheus = ready["prometheus"]["url"]
    _, generate_secret = await _create_key(full_mesh)
    key_id, throttled_secret = await _create_key(full_mesh, requests_per_minute=1)
    # A counter first seen by a scrape has no rate yet: one round of traffic,
    # a scrape of what it made, then the round the rates are taken over.
    await _traffic(full_mesh, generate_secret, throttled_secret)
    await _until_found(
        prometheus,
        {
            "ttft": 'mlmesh_gateway_time_to_first_token_seconds_count{model="tiny-llama"}',
            "throttled": f'mlmesh_throttle_rejections_total{{key_id="{key_id}"}}',
            "triton": 'mlmesh_triton_queued_requests_total{model="digits"} > 0',
            "features": 'mlmesh_features_online_read_seconds_count{view="user_spend"}',
            "rpc": f'mlmesh_rpc_requests_total{{method="{FEATURES_READ}"}}',
        },
    )
    await _traffic(full_mesh, generate_secret, throttled_secret)
    found = await _until_found(
        prometheus,
        {
            "ttft": 'mlmesh:gateway_ttft_seconds:p99_5m{model="tiny-llama"}',
            "requests": f'mlmesh:rpc_requests:rate5m{{method="{GATEWAY_GENERATE}"}} > 0',
            "errors": f'mlmesh:rpc_error_ratio:rate5m{{method="{GATEWAY_GENERATE}"}}',
            "throttled": f'mlmesh:throttle_rejections:rate5m{{key_id="{key_id}"}} > 0',
            "llm_saturation": 'mlmesh:llm_saturation:ratio{model="tiny-llama"}',
            "llm_waiting": 'mlmesh:llm_requests_waiting:avg5m{model="tiny-llama"}',
            "triton_queue": 'mlmesh:triton_queue_seconds:mean5m{model="digits"}',
            "ledger_lag": 'mlmesh:usage_flush_lag_seconds:max{sink="ledger"}',
            "feature_p99": "mlmesh:features_get_online_seconds:p99_5m",
            "feature_view_p99": 'mlmesh:features_online_read_seconds:p99_5m{view="user_spend"}',
            "freshness": 'mlmesh:features_freshness_seconds{view="user_last_purchase"}',
        },
    )

    def value(name: str) -> float:
        return float(found[name][0]["value"][1])

    assert 0 < value("ttft") < 60
    assert 0 <= value("errors") <= 1
    assert 0 <= value("llm_saturation") <= 1
    assert value("triton_queue") >= 0
    assert 0 <= value("ledger_lag") < 60
    assert 0 < value("feature_p99") < 10
    assert -60 < value("freshness") < 3600  # pushed with the current time

    # Every rule of every group loaded and evaluates without error.
    groups = (await asyncio.to_thread(_get, f"{prometheus}/api/v1/rules"))["data"]["groups"]
    names = {group["name"] for group in groups}
    assert {"mlmesh-slo-recording", "mlmesh-slo-alerts"} <= names, names
    broken = [
        (rule["name"], rule.get("lastError"))
        for group in groups
        for rule in group["rules"]
        if rule["health"] == "err"
    ]
    assert not broken, broken

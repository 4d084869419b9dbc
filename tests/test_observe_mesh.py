"""`mlmesh-run --observe` on the real mesh: one Generate through Envoy is one
trace in Phoenix (fetched through Phoenix's REST API), and a real Prometheus
scrapes the gateway and Envoy (read back through its HTTP API)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from meshkit import generate_request
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, key_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh_chassis.testing import expect_error
from mlmesh_sdk.channel import mesh_channel

pytestmark = pytest.mark.timeout(400)

GATEWAY_GENERATE = "/mlmesh.gateway.v1.GatewayService/Generate"
LLM_GENERATE = "/mlmesh.llm.v1.LlmService/Generate"
# How long to wait for what is exported in the background (spans every
# second, Envoy's every 5 s; scrapes every 2 s) before failing.
ARRIVAL_S = 90.0


def _ready(mesh: Any) -> dict[str, Any]:
    return dict(json.loads((Path(mesh.state_dir) / "ready.json").read_text()))


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def _flat(attributes: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Phoenix nests dotted attribute names ({"gen_ai": {"system": ...}}):
    back to dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in attributes.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _spans(phoenix: str, **filters: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"limit": "1000", **filters})
    spans = _get(f"{phoenix}/v1/projects/default/spans?{query}")["data"]
    for span in spans:
        span["attributes"] = _flat(span.get("attributes") or {})
    return list(spans)


async def _trace_of(phoenix: str, request_id: str, services: set[str]) -> list[dict[str, Any]]:
    """Every span of the one trace that served ``request_id``, once spans
    from ``services`` have arrived (and no more arrive)."""
    deadline = time.monotonic() + ARRIVAL_S
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        tagged = await asyncio.to_thread(
            _spans, phoenix, attribute=f"mlmesh.request_id:{json.dumps(request_id)}"
        )
        trace_ids = {s["context"]["trace_id"] for s in tagged}
        assert len(trace_ids) <= 1, f"request {request_id} is in several traces: {trace_ids}"
        if trace_ids:
            trace = await asyncio.to_thread(_spans, phoenix, trace_id=trace_ids.pop())
            if services <= {s["attributes"].get("service.name") for s in trace} and len(
                trace
            ) == len(seen):
                return trace
            seen = trace
        await asyncio.sleep(1.0)
    got = sorted({str(s["attributes"].get("service.name")) for s in seen})
    raise AssertionError(f"no trace with spans of {sorted(services)} for {request_id}: {got}")


@pytest.fixture
async def generate_key(full_mesh: Any) -> str:
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        reply = await keys.CreateKey(
            keys_rpc.CreateKeyRequest(
                key=pb.Key(
                    display_name="observe",
                    scopes=pb.KeyScopes(services=[pb.PLATFORM_SERVICE_GENERATE]),
                )
            )
        )
    return str(reply.secret)


async def test_one_generate_is_one_parent_linked_trace_in_phoenix(
    full_mesh: Any, generate_key: str
) -> None:
    ready = _ready(full_mesh)
    phoenix = ready["phoenix"]["url"]
    request_id = f"observe-{uuid.uuid4().hex}"
    async with mesh_channel(full_mesh.address, generate_key) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        chunks = [
            c
            async for c in gateway.Generate(
                generate_request(max_tokens=6, seed=1), metadata=[("x-request-id", request_id)]
            )
        ]
    assert sum(c.response.token_count for c in chunks) > 0

    trace = await _trace_of(phoenix, request_id, {"envoy", "gateway", "llm"})
    by_id = {s["context"]["span_id"]: s for s in trace}
    service = {i: s["attributes"].get("service.name") for i, s in by_id.items()}
    # One root, Envoy's (the client sent no trace context); every other span's
    # parent is a span of this trace: one parent-linked tree.
    roots = [s for s in trace if s["parent_id"] is None]
    assert [service[r["context"]["span_id"]] for r in roots] == ["envoy"], trace
    assert all(s["parent_id"] in by_id for s in trace if s["parent_id"] is not None), trace

    def chain(span: dict[str, Any]) -> list[str]:
        """The services from the root down to ``span``."""
        names = []
        while span is not None:
            names.append(service[span["context"]["span_id"]])
            span = by_id.get(span["parent_id"]) if span["parent_id"] else None
        return names[::-1]

    (gateway_span,) = [s for s in trace if s["name"] == GATEWAY_GENERATE]
    (llm_span,) = [s for s in trace if s["name"] == LLM_GENERATE]
    assert chain(gateway_span) == ["envoy", "gateway"]
    llm_chain = chain(llm_span)
    assert llm_chain[:2] == ["envoy", "gateway"] and llm_chain[-1] == "llm", llm_chain
    for span in trace:  # the registry, where the gateway or the llm called it
        if service[span["context"]["span_id"]] == "registry":
            assert chain(span)[:2] == ["envoy", "gateway"], chain(span)
    # The GenAI attributes the gateway sets on its span.
    attributes = gateway_span["attributes"]
    assert attributes["gen_ai.operation.name"]
    assert attributes["gen_ai.request.model"] == "tiny-llama"
    assert attributes["gen_ai.usage.output_tokens"] == sum(c.response.token_count for c in chunks)


async def test_logs_carry_the_trace_id_of_the_call(full_mesh: Any, generate_key: str) -> None:
    """A call that fails is logged inside its span (by the registry, which
    answers NOT_FOUND; the gateway passes the status on): the log line's
    trace id is the trace Phoenix holds for that request."""
    ready = _ready(full_mesh)
    request_id = f"observe-{uuid.uuid4().hex}"
    bad = generate_request(max_tokens=6)
    bad.request.model.model = "no-such-model"
    async with mesh_channel(full_mesh.address, generate_key) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)

        async def call() -> None:
            async for _ in gateway.Generate(bad, metadata=[("x-request-id", request_id)]):
                pass

        await expect_error(call(), grpc.StatusCode.NOT_FOUND)
    trace = await _trace_of(ready["phoenix"]["url"], request_id, {"envoy", "gateway"})
    trace_id = trace[0]["context"]["trace_id"]
    lines = [
        json.loads(line)
        for service in ready["services"].values()
        for line in Path(service["log"]).read_text(errors="replace").splitlines()
        if request_id in line and line.startswith("{")
    ]
    assert lines, f"no service logged {request_id}"
    assert {line.get("trace_id") for line in lines} == {trace_id}, lines


async def test_prometheus_scrapes_the_gateway_and_envoy(full_mesh: Any, generate_key: str) -> None:
    ready = _ready(full_mesh)
    prometheus = ready["prometheus"]["url"]
    async with mesh_channel(full_mesh.address, generate_key) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        async for _ in gateway.Generate(generate_request(max_tokens=4, seed=2)):
            pass

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        reply = _get(url)
        assert reply["status"] == "success", reply
        return list(reply["data"]["result"])

    wanted = {
        "gateway": f'mlmesh_rpc_requests_total{{job="gateway",method="{GATEWAY_GENERATE}"}}',
        "envoy": "envoy_http_downstream_rq_total"
        '{job="envoy",envoy_http_conn_manager_prefix="ingress"}',
    }
    deadline = time.monotonic() + ARRIVAL_S
    while True:
        targets = (await asyncio.to_thread(_get, f"{prometheus}/api/v1/targets"))["data"]
        active = targets["activeTargets"]
        found = {name: await asyncio.to_thread(query, expr) for name, expr in wanted.items()}
        jobs = {t["labels"]["job"] for t in active}
        all_up = active and all(t["health"] == "up" for t in active)
        if all_up and {"gateway", "envoy"} <= jobs and all(found.values()):
            break
        if time.monotonic() > deadline:
            health = [(t["labels"]["job"], t["health"], t.get("lastError")) for t in active]
            raise AssertionError(f"targets {health}; series {found}")
        await asyncio.sleep(1.0)
    # Every instance the runner started is a target (its metrics port).
    instances = {t["labels"].get("mlmesh_instance") for t in active}
    expected = {name for name, s in ready["services"].items() if s.get("metrics_port")}
    assert expected <= instances, (expected, instances)
    # The gateway served Generate calls: its counter is a real, positive series.
    assert float(found["gateway"][0]["value"][1]) >= 1
    assert float(found["envoy"][0]["value"][1]) >= 1

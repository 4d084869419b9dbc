"""The registry through real Envoy, against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
from mlmesh.registry.v1 import model_pb2
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh_chassis.testing import expect_error
from registry_helpers import chunks, download, header, ref, stream, upload

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def artifact_files(mesh, model: str) -> list[Path]:
    """The model's artifact files, and every upload in progress (uploads are
    written to `.uploads/` and moved into the model's folder once verified)."""
    root = mesh.state_dir / "artifacts"
    return sorted(
        path
        for directory in (root / model, root / ".uploads")
        if directory.exists()
        for path in directory.iterdir()
    )


async def versions_of(registry, model: str) -> list[int]:
    try:
        reply = await registry.ListModelVersions(rpc.ListModelVersionsRequest(model=model))
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return []
        raise
    return [v.version for v in reply.model_versions]


async def test_upload_download_round_trip(registry, unique):
    data = os.urandom(3 * 1024 * 1024 + 17)
    version = await upload(registry, unique, data, tags={"stage": "dev"})
    assert (version.model, version.version, version.size_bytes) == (unique, 1, len(data))
    fetched, body = await download(registry, ref(unique, version=1))
    assert body == data and fetched.sha256 == version.sha256
    assert fetched.lineage.environment_lock == "x==1"
    # resumable from an offset
    _, tail = await download(registry, ref(unique), offset=1_000_000)
    assert tail == data[1_000_000:]


async def test_version_visible_only_when_complete(registry, unique):
    data = os.urandom(512 * 1024)
    gate = asyncio.Event()

    async def slow():
        yield header(unique, data)
        parts = list(chunks(data, 128 * 1024))
        yield parts[0]
        await gate.wait()
        for part in parts[1:]:
            yield part

    call = registry.UploadModelVersion(slow())
    await asyncio.sleep(0.3)
    assert await versions_of(registry, unique) == []
    gate.set()
    assert (await call).model_version.version == 1
    assert await versions_of(registry, unique) == [1]


@pytest.mark.parametrize("bad", ["Upper", "x", "-lead", "a" * 64, "has space"])
async def test_invalid_model_names(registry, bad):
    details = await expect_error(
        registry.CreateModel(rpc.CreateModelRequest(model=model_pb2.Model(name=bad))), INVALID
    )
    assert details.error_info.reason == "INVALID_ARGUMENT"
    assert details.error_info.domain == "mlmesh.registry"
    assert details.bad_request.field_violations[0].field == "model.name"


@pytest.mark.parametrize("bad", ["probe-nl\n", "a" * 40_000])
async def test_a_newline_or_40_kb_name_gets_invalid_argument_through_envoy(registry, bad):
    # a 40 KB name used to come back as a status too large for Envoy's
    # headers ("protocol error"), a trailing newline to be accepted
    details = await expect_error(
        registry.CreateModel(rpc.CreateModelRequest(model=model_pb2.Model(name=bad))), INVALID
    )
    assert details.error_info.reason == "INVALID_ARGUMENT"
    assert len(details.message) < 300
    assert details.bad_request.field_violations[0].field == "model.name"
    assert details.bad_request.ByteSize() < 512


async def test_upload_faults_leave_nothing_behind(registry, unique, mesh):
    data = os.urandom(200_000)
    cases = [
        # header missing: the first message is a chunk
        (stream(chunks(data)), INVALID, "INVALID_ARGUMENT", "header"),
        # empty chunk
        (
            stream(header(unique, data), rpc.UploadModelVersionRequest(chunk=b"")),
            INVALID,
            "INVALID_ARGUMENT",
            "chunk",
        ),
        # oversized chunk (> 4 MiB)
        (
            stream(
                header(unique, b"x" * (5 << 20)),
                rpc.UploadModelVersionRequest(chunk=b"x" * (5 << 20)),
            ),
            INVALID,
            "INVALID_ARGUMENT",
            "chunk",
        ),
        # bad checksum format
        (
            stream(header(unique, data, sha256="nothex"), chunks(data)),
            INVALID,
            "INVALID_ARGUMENT",
            "header.sha256",
        ),
        # checksum mismatch
        (
            stream(header(unique, data, sha256="0" * 64), chunks(data)),
            grpc.StatusCode.DATA_LOSS,
            "CHECKSUM_MISMATCH",
            None,
        ),
        # stream ends early
        (
            stream(header(unique, data), chunks(data[:100_000])),
            grpc.StatusCode.ABORTED,
            "UPLOAD_INCOMPLETE",
            None,
        ),
        # more bytes than declared
        (stream(header(unique, data[:10]), chunks(data)), INVALID, "INVALID_ARGUMENT", None),
    ]
    for requests, code, reason, field in cases:
        details = await expect_error(registry.UploadModelVersion(requests), code)
        assert details.error_info.reason == reason, details
        if field:
            assert details.bad_request.field_violations[0].field == field
    assert await versions_of(registry, unique) == []
    assert artifact_files(mesh, unique) == []


async def test_upload_cut_off_mid_stream(registry, unique, mesh):
    data = os.urandom(1 << 20)

    async def forever():
        yield header(unique, data)
        yield rpc.UploadModelVersionRequest(chunk=data[:4096])
        await asyncio.Event().wait()  # never finishes: the client goes away

    call = registry.UploadModelVersion(forever())
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(50):  # the server notices the reset and cleans up
        if not [p for p in artifact_files(mesh, unique) if p.suffix == ".partial"]:
            break
        await asyncio.sleep(0.1)
    assert artifact_files(mesh, unique) == []
    assert await versions_of(registry, unique) == []


async def test_unknown_model_without_create(registry, unique):
    details = await expect_error(
        registry.UploadModelVersion(
            stream(header(unique, b"abc", create_model=False), chunks(b"abc"))
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details.error_info.metadata["name"] == unique


async def test_concurrent_uploads_get_distinct_versions(registry, unique):
    await upload(registry, unique, b"seed")
    blobs = [os.urandom(100_000 + i) for i in range(8)]
    results = await asyncio.gather(*(upload(registry, unique, blob) for blob in blobs))
    numbers = sorted(v.version for v in results)
    assert numbers == list(range(2, 10))
    for version, blob in zip(results, blobs, strict=True):
        _, body = await download(registry, ref(unique, version=version.version))
        assert body == blob


async def test_aliases_history_and_rollback(registry, unique):
    for i in range(3):
        await upload(registry, unique, f"v{i}".encode())
    details = await expect_error(
        registry.SetAlias(rpc.SetAliasRequest(model=unique, alias="champion", version=9)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details.error_info.metadata["resource_type"] == "model version"
    await registry.SetAlias(rpc.SetAliasRequest(model=unique, alias="champion", version=1))
    await registry.SetAlias(
        rpc.SetAliasRequest(model=unique, alias="champion", version=3, reason="better")
    )
    resolved = await registry.ResolveModelReference(
        rpc.ResolveModelReferenceRequest(reference=ref(unique, alias="champion"))
    )
    assert resolved.model_version.version == 3
    assert list(resolved.model_version.aliases) == ["champion"]
    rolled = await registry.RollbackAlias(rpc.RollbackAliasRequest(model=unique, alias="champion"))
    assert rolled.alias.version == 1
    assert rolled.event.action == model_pb2.AliasEvent.ACTION_ROLLED_BACK
    # compare-and-set
    details = await expect_error(
        registry.SetAlias(
            rpc.SetAliasRequest(model=unique, alias="champion", version=2, expected_version=3)
        ),
        grpc.StatusCode.ABORTED,
    )
    assert details.error_info.metadata["current_version"] == "1"
    await registry.DeleteAlias(rpc.DeleteAliasRequest(model=unique, alias="champion"))
    await expect_error(
        registry.ResolveModelReference(
            rpc.ResolveModelReferenceRequest(reference=ref(unique, alias="champion"))
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    history = await registry.ListAliasHistory(rpc.ListAliasHistoryRequest(model=unique))
    actions = [model_pb2.AliasEvent.Action.Name(e.action) for e in history.events]
    assert actions == ["ACTION_CREATED", "ACTION_MOVED", "ACTION_ROLLED_BACK", "ACTION_DELETED"]
    # a fresh alias has nothing to roll back to
    await registry.SetAlias(rpc.SetAliasRequest(model=unique, alias="fresh", version=2))
    details = await expect_error(
        registry.RollbackAlias(rpc.RollbackAliasRequest(model=unique, alias="fresh")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details.error_info.reason == "FAILED_PRECONDITION"


async def test_concurrent_alias_moves_keep_history_complete(registry, unique):
    for i in range(5):
        await upload(registry, unique, f"v{i}".encode())
    targets = [1 + (i % 5) for i in range(40)]
    replies = await asyncio.gather(
        *(
            registry.SetAlias(rpc.SetAliasRequest(model=unique, alias="live", version=t))
            for t in targets
        )
    )
    # a set that finds the alias already there records nothing (no event)
    moved = sorted(r.event.sequence for r in replies if r.HasField("event"))
    events = []
    token = ""
    while True:
        page = await registry.ListAliasHistory(
            rpc.ListAliasHistoryRequest(model=unique, alias="live", page_size=7, page_token=token)
        )
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            break
    sequences = [e.sequence for e in events]
    assert sequences == moved and len(set(sequences)) == len(events) >= 1
    assert events[0].from_version == 0
    assert all(e.from_version != e.to_version for e in events)
    for before, after in itertools.pairwise(events):
        assert after.from_version == before.to_version  # no lost or reordered move
    current = await registry.GetAlias(rpc.GetAliasRequest(model=unique, alias="live"))
    assert current.alias.version == events[-1].to_version


async def test_experiments_and_watch(registry, unique):
    for i in range(2):
        await upload(registry, unique, f"v{i}".encode())
    first = await registry.ListAliasHistory(rpc.ListAliasHistoryRequest(model=unique))
    assert list(first.events) == []
    watch = registry.WatchEvents(rpc.WatchEventsRequest(models=[unique]))
    bad = model_pb2.Experiment(
        name=unique,
        model=unique,
        arms=[
            model_pb2.ExperimentArm(name="a", version=1, weight=60),
            model_pb2.ExperimentArm(name="b", version=2, weight=30),
        ],
    )
    details = await expect_error(
        registry.CreateExperiment(rpc.CreateExperimentRequest(experiment=bad)), INVALID
    )
    assert "sum to 100" in details.bad_request.field_violations[0].description
    bad.arms[1].weight = 40
    bad.shadow.CopyFrom(model_pb2.ShadowTraffic(version=2, percent=5))
    created = await registry.CreateExperiment(rpc.CreateExperimentRequest(experiment=bad))
    assert created.experiment.state == model_pb2.EXPERIMENT_STATE_RUNNING
    assert created.experiment.stickiness_key == "api_key"
    await registry.SetAlias(rpc.SetAliasRequest(model=unique, alias="champion", version=2))
    await registry.StopExperiment(rpc.StopExperimentRequest(name=unique))
    seen = []
    async for event in watch:
        seen.append(event.WhichOneof("event"))
        if len(seen) == 3:
            break
    watch.cancel()
    assert seen == ["experiment_event", "alias_event", "experiment_event"]
    listed = await registry.ListExperiments(
        rpc.ListExperimentsRequest(model=unique, state=model_pb2.EXPERIMENT_STATE_STOPPED)
    )
    assert [e.name for e in listed.experiments] == [unique]


async def test_pagination_and_filters(registry, unique):
    for i in range(7):
        await registry.CreateModel(
            rpc.CreateModelRequest(
                model=model_pb2.Model(
                    name=f"{unique}-{i}", tags={"team": "odd" if i % 2 else "even"}
                )
            )
        )
    names, token = [], ""
    while True:
        page = await registry.ListModels(
            rpc.ListModelsRequest(name_prefix=unique, page_size=3, page_token=token)
        )
        names += [m.name for m in page.models]
        token = page.next_page_token
        if not token:
            break
    assert names == [f"{unique}-{i}" for i in range(7)]
    odd = await registry.ListModels(rpc.ListModelsRequest(name_prefix=unique, tags={"team": "odd"}))
    assert [m.name for m in odd.models] == [f"{unique}-{i}" for i in (1, 3, 5)]
    details = await expect_error(
        registry.ListModels(rpc.ListModelsRequest(page_token="garbage")), INVALID
    )
    assert details.bad_request.field_violations[0].field == "page_token"
    first = await registry.ListModels(rpc.ListModelsRequest(name_prefix=unique, page_size=2))
    await expect_error(
        registry.ListModels(
            rpc.ListModelsRequest(name_prefix=unique + "-1", page_token=first.next_page_token)
        ),
        INVALID,
    )


async def test_postgres_outage_is_unavailable_then_recovers(registry, unique, mesh):
    if mesh.backend != "postgres":
        pytest.skip("the outage test stops the PostgreSQL server")
    await registry.CreateModel(rpc.CreateModelRequest(model=model_pb2.Model(name=unique)))
    cluster = os.listdir("/etc/postgresql")[0]
    ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main"]
    subprocess.run([*ctl, "stop", "-m", "fast"], check=True)
    try:
        details = await expect_error(
            registry.GetModel(rpc.GetModelRequest(name=unique), timeout=20),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert details.error_info.reason == "BACKEND_UNAVAILABLE"
        assert details.retry_info.retry_delay.ToTimedelta().total_seconds() > 0
    finally:
        subprocess.run([*ctl, "start"], check=True)
    for _ in range(100):
        try:
            reply = await registry.GetModel(rpc.GetModelRequest(name=unique), timeout=5)
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.2)
    else:
        pytest.fail("the registry did not recover after PostgreSQL came back")
    assert reply.model.name == unique


async def test_trace_and_request_ids_cross_envoy_into_logs(registry, mesh):
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    await expect_error(
        registry.GetModel(
            rpc.GetModelRequest(name="no-such-model"),
            metadata=[
                ("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"),
                ("x-request-id", "trace-test-1"),
            ],
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    log_path = Path(mesh.services["registry"]["log"])
    for _ in range(20):
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if trace_id in line]
        if lines:
            break
        await asyncio.sleep(0.1)
    assert lines, "the registry log has no line with the caller's trace id"
    assert lines[-1]["request_id"] == "trace-test-1"
    assert "NOT_FOUND" in lines[-1]["msg"]


async def test_metrics_and_admin_endpoints(registry, mesh, unique):
    await registry.CreateModel(rpc.CreateModelRequest(model=model_pb2.Model(name=unique)))
    metrics_port = mesh.services["registry"]["metrics_port"]
    text = await asyncio.to_thread(
        lambda: (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
    )
    assert 'method="/mlmesh.registry.v1.RegistryService/CreateModel"' in text
    stats = await asyncio.to_thread(
        lambda: (
            urllib.request.urlopen(
                f"http://{mesh.admin}/stats?filter=cluster.registry.upstream_rq_total", timeout=5
            )
            .read()
            .decode()
        )
    )
    assert int(stats.split(":")[-1]) > 0

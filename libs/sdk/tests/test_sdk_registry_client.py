"""RegistryClient against a real registry (see conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh.registry.v1 import registry_service_pb2_grpc
from mlmesh_chassis.testing import expect_error
from mlmesh_sdk.registry import ChecksumMismatchError, RegistryClient
from mlmesh_sdk.snapshot import pack_folder, source_snapshot
from sdk_folders import make_folder, tree_of


async def _artifact_bytes(client: RegistryClient, reference: str, tmp_path: Path) -> bytes:
    dest = tmp_path / "whole.tar"
    await client.download(reference, dest, resume=False)
    return dest.read_bytes()


async def test_upload_folder_then_download_folder_round_trips(
    registry_target: str, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "model")
    async with RegistryClient(registry_target) as client:
        version = await client.upload_folder(
            "round-trip",
            folder,
            description="first",
            tags={"team": "risk"},
            format="sklearn",
            chunk_bytes=512 * 1024,
        )
        assert (version.model, version.version, version.format) == ("round-trip", 1, "sklearn")
        assert dict(version.tags) == {"team": "risk"}
        downloaded = await client.download_folder("round-trip/1", tmp_path / "out" / "model")
    assert downloaded.sha256 == version.sha256
    assert tree_of(tmp_path / "out" / "model") == tree_of(folder)
    # nothing left beside the destination once extracted
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]


async def test_the_artifact_is_the_reproducible_tar(registry_target: str, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "model", seed=3, big_bytes=50_000)
    packed = pack_folder(folder)
    packed.path.unlink()
    async with RegistryClient(registry_target) as client:
        version = await client.upload_folder("reproducible", folder)
        again = await client.upload_folder("reproducible", folder)
    assert version.sha256 == again.sha256 == packed.sha256
    assert version.size_bytes == packed.size_bytes
    assert (version.version, again.version) == (1, 2)


async def test_lineage_records_source_environment_and_run(
    registry_target: str, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "model", big_bytes=20_000)
    source = make_folder(tmp_path / "src", seed=9, big_bytes=100)
    async with RegistryClient(registry_target) as client:
        version = await client.upload_folder(
            "lineage",
            folder,
            run_metadata={"lr": 0.01, "epochs": 3, "run": "abc", "layers": [1, 2]},
            feature_service="churn-features",
        )
        from_source = await client.upload_folder("lineage", folder, source_folder=source)
        resolved = await client.resolve("lineage/1")
    lineage = resolved.lineage
    expected = source_snapshot(folder)
    assert lineage.source.tree_sha256 == expected.tree_sha256
    assert [f.path for f in lineage.source.files] == [
        "config.json",
        "run.sh",
        "tokenizer/nested/vocab.txt",
        "weights/model.bin",
        "weights/small.npy",
    ]
    by_path = {f.path: f for f in lineage.source.files}
    config = (folder / "config.json").read_bytes()
    assert by_path["config.json"].sha256 == hashlib.sha256(config).hexdigest()
    assert by_path["weights/model.bin"].size_bytes == 20_000
    assert "grpcio==" in lineage.environment_lock
    assert dict(lineage.run_metadata) == {"lr": 0.01, "epochs": 3, "run": "abc", "layers": [1, 2]}
    assert lineage.feature_service == "churn-features"
    assert version.lineage == lineage
    assert from_source.lineage.source.tree_sha256 == source_snapshot(source).tree_sha256
    assert from_source.lineage.source.tree_sha256 != expected.tree_sha256


async def test_resumed_download_gives_the_same_file(registry_target: str, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "model", big_bytes=2_500_000)
    async with RegistryClient(registry_target) as client:
        version = await client.upload_folder("resume", folder)
        whole = await _artifact_bytes(client, "resume", tmp_path)
        assert hashlib.sha256(whole).hexdigest() == version.sha256
        for cut in (1, 1024 * 1024 + 5, len(whole) - 1, len(whole)):
            dest = tmp_path / f"cut-{cut}.tar"
            dest.write_bytes(whole[:cut])
            got = await client.download("resume/1", dest)
            assert got.sha256 == version.sha256
            assert dest.read_bytes() == whole


async def test_resume_keeps_the_prefix_and_a_wrong_one_is_caught(
    registry_target: str, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "model", big_bytes=300_000)
    async with RegistryClient(registry_target) as client:
        await client.upload_folder("bad-prefix", folder)
        whole = await _artifact_bytes(client, "bad-prefix", tmp_path)
        dest = tmp_path / "dest.tar"
        dest.write_bytes(b"\0" * 1000)  # not the artifact's first bytes
        with pytest.raises(ChecksumMismatchError, match="was deleted"):
            await client.download("bad-prefix", dest)
        assert not dest.exists()
        # resume=False starts afresh; a file longer than the artifact too
        dest.write_bytes(b"\0" * 1000)
        await client.download("bad-prefix", dest, resume=False)
        assert dest.read_bytes() == whole
        dest.write_bytes(whole + b"trailing")
        await client.download("bad-prefix", dest)
        assert dest.read_bytes() == whole


async def test_download_by_alias_pins_the_version(registry_target: str, tmp_path: Path) -> None:
    async with RegistryClient(registry_target) as client:
        v1 = await client.upload_folder("pinned", make_folder(tmp_path / "a", seed=1))
        await client.upload_folder("pinned", make_folder(tmp_path / "b", seed=2))
        await client.set_alias("pinned", "prod", v1.version)
        got = await client.download_folder(
            ModelReference(model="pinned", alias="prod"), tmp_path / "out"
        )
    assert (got.version, got.sha256) == (1, v1.sha256)
    assert tree_of(tmp_path / "out") == tree_of(tmp_path / "a")


async def test_upload_file_and_download(registry_target: str, tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(bytes(range(256)) * 9000)
    async with RegistryClient(registry_target) as client:
        version = await client.upload_file(
            "single-file", artifact, format="onnx", source_folder=make_folder(tmp_path / "src")
        )
        assert version.sha256 == hashlib.sha256(artifact.read_bytes()).hexdigest()
        assert len(version.lineage.source.files) == 5
        await client.download("single-file", tmp_path / "copy.onnx")
        assert (tmp_path / "copy.onnx").read_bytes() == artifact.read_bytes()
        with pytest.raises(ValueError, match="not a tar archive"):
            await client.download_folder("single-file", tmp_path / "as-folder")


async def test_lists_follow_pages(registry_target: str, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=100)
    async with RegistryClient(registry_target) as client:
        for name in ("paged-c", "paged-a", "paged-b"):
            await client.upload_folder(name, folder, tags={"kind": "paged"})
        for _ in range(2):
            await client.upload_folder("paged-a", folder)
        names = [m.name async for m in client.list_models(name_prefix="paged-", page_size=1)]
        assert names == ["paged-a", "paged-b", "paged-c"]
        assert [
            m.latest_version
            for m in [m async for m in client.list_models(name_prefix="paged-a", page_size=1)]
        ] == [3]
        versions = [v.version async for v in client.list_versions("paged-a", page_size=2)]
        assert versions == [3, 2, 1]
        tagged = [v.version async for v in client.list_versions("paged-a", tags={"kind": "paged"})]
        assert tagged == [1]


async def test_aliases_move_roll_back_and_keep_history(
    registry_target: str, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=100)
    async with RegistryClient(registry_target) as client:
        for _ in range(2):
            await client.upload_folder("aliased", folder)
        created = await client.set_alias("aliased", "champion", 1, "first")
        assert created.alias.version == 1
        assert created.event.action == pb.AliasEvent.ACTION_CREATED
        await client.set_alias("aliased", "champion", 2, "better", expected_version=1)
        assert (await client.resolve("aliased@champion")).version == 2
        await expect_error(
            client.set_alias("aliased", "champion", 1, expected_version=1),
            grpc.StatusCode.ABORTED,
        )
        rolled = await client.rollback_alias("aliased", "champion", "regression")
        assert rolled.alias.version == 1
        assert (await client.resolve("aliased@champion")).version == 1
        await client.set_alias("aliased", "canary", 2)
        history = [e async for e in client.alias_history("aliased", "champion", page_size=1)]
        assert [(e.action, e.from_version, e.to_version, e.reason) for e in history] == [
            (pb.AliasEvent.ACTION_CREATED, 0, 1, "first"),
            (pb.AliasEvent.ACTION_MOVED, 1, 2, "better"),
            (pb.AliasEvent.ACTION_ROLLED_BACK, 2, 1, "regression"),
        ]
        every = [e.alias async for e in client.alias_history("aliased")]
        assert every == ["champion", "champion", "champion", "canary"]


async def test_errors_carry_status_and_error_info(registry_target: str, tmp_path: Path) -> None:
    async with RegistryClient(registry_target) as client:
        details = await expect_error(client.resolve("nosuchmodel@x"), grpc.StatusCode.NOT_FOUND)
        assert details.error_info is not None
        assert details.error_info.reason == "MODEL_NOT_FOUND"
        assert details.error_info.domain == "mlmesh.registry"
        assert dict(details.error_info.metadata) == {
            "resource_type": "model",
            "name": "nosuchmodel",
        }
        details = await expect_error(
            client.upload_folder("not-created", make_folder(tmp_path / "m"), create_model=False),
            grpc.StatusCode.NOT_FOUND,
        )
        assert details.error_info is not None and details.error_info.reason == "MODEL_NOT_FOUND"
        await expect_error(
            client.download("nosuchmodel", tmp_path / "x"), grpc.StatusCode.NOT_FOUND
        )
        assert not (tmp_path / "x").exists()
        with pytest.raises(ValueError, match="chunk_bytes"):
            await client.upload_folder("m1", tmp_path / "m", chunk_bytes=5 * 1024 * 1024)
        with pytest.raises(ValueError, match="model name"):
            await client.resolve("Bad Name")


class _RecordingRegistry(registry_service_pb2_grpc.RegistryServiceServicer):
    """Answers ResolveModelReference and records the metadata it was sent."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def ResolveModelReference(self, request, context):  # type: ignore[no-untyped-def]
        self.seen.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        return rpc.ResolveModelReferenceResponse(model_version=pb.ModelVersion(version=1))


async def test_api_key_is_sent_as_bearer_metadata() -> None:
    recorder = _RecordingRegistry()
    server = grpc.aio.server()
    registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with RegistryClient(f"127.0.0.1:{port}", api_key="k-123") as client:
            await client.resolve("abc")
        async with RegistryClient(f"127.0.0.1:{port}") as client:
            await client.resolve("abc")
    finally:
        await server.stop(None)
    assert recorder.seen[0]["authorization"] == "Bearer k-123"
    assert "authorization" not in recorder.seen[1]


async def test_unopened_client_says_how_to_open_it() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await RegistryClient().resolve("abc")


class _FlakyDownloads(registry_service_pb2_grpc.RegistryServiceServicer):
    """Serves one artifact; the first download is cut off halfway with
    UNAVAILABLE, a stalling one sends nothing after the metadata."""

    def __init__(self, data: bytes, stall: bool = False) -> None:
        self.data = data
        self.stall = stall
        self.offsets: list[int] = []
        self.version = pb.ModelVersion(
            model="flaky",
            version=1,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        )

    async def ResolveModelReference(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.ResolveModelReferenceResponse(model_version=self.version)

    async def DownloadModelVersion(self, request, context):  # type: ignore[no-untyped-def]
        self.offsets.append(request.offset)
        yield rpc.DownloadModelVersionResponse(model_version=self.version)
        if self.stall:
            await asyncio.sleep(30)
        half = len(self.data) // 2
        if len(self.offsets) == 1:
            yield rpc.DownloadModelVersionResponse(chunk=self.data[:half])
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        for start in range(request.offset, len(self.data), 1000):
            yield rpc.DownloadModelVersionResponse(chunk=self.data[start : start + 1000])


async def _serve(servicer: registry_service_pb2_grpc.RegistryServiceServicer) -> tuple[Any, str]:
    server = grpc.aio.server()
    registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_a_cut_off_download_is_retried_from_where_it_stopped(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    servicer = _FlakyDownloads(data)
    server, target = await _serve(servicer)
    try:
        async with RegistryClient(target) as client:
            await client.download("flaky", tmp_path / "f.bin")
    finally:
        await server.stop(None)
    assert servicer.offsets == [0, len(data) // 2]
    assert (tmp_path / "f.bin").read_bytes() == data


async def test_a_stalled_download_times_out_and_keeps_the_file(tmp_path: Path) -> None:
    servicer = _FlakyDownloads(b"x" * 100, stall=True)
    server, target = await _serve(servicer)
    try:
        async with RegistryClient(target, timeout=0.3) as client:
            with pytest.raises(TimeoutError, match="no data from the registry"):
                await client.download("flaky", tmp_path / "f.bin")
    finally:
        await server.stop(None)
    assert (tmp_path / "f.bin").exists()

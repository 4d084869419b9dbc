"""Artifact upload/download throughput of the registry, through Envoy and direct,
against a plain local file copy of the same bytes.

    python bench/registry_artifacts.py [--size-mb 200] [--chunk-mib 1] [--repeat 3]

Starts its own mesh (registry + Envoy) in a temporary state directory, writes
one random artifact to a temp file, then per repeat (envoy/direct order
alternates between repeats):

* copy          shutil.copyfile of the artifact to another temp path
* copy+sha256   the copy plus reading the copy back and hashing it (what the
                registry does on upload: write the bytes and sha256 them)
* upload        UploadModelVersion (client stream: header, then chunks read from
                the file), through Envoy and straight to the registry's port;
                every upload creates a new version
* download      DownloadModelVersion of version 1, through Envoy and direct;
                chunks are kept in memory and sha256-verified after the timer

Prints a table (median MB/s over the repeats, MB = 10^6 bytes) and writes
bench/results/registry_artifacts.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import _common as common
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh.registry.v1 import registry_service_pb2_grpc

NAME = "registry_artifacts"
MODEL = "bench-artifacts"
READ_BYTES = common.MIB


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size-mb", type=float, default=200, help="artifact size in MB (10^6 bytes; default 200)"
    )
    parser.add_argument(
        "--chunk-mib", type=float, default=1, help="upload chunk size in MiB (max 4; default 1)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (default 3)")
    common.add_common_args(parser)
    args = parser.parse_args()
    if not 0 < args.chunk_mib <= 4:
        parser.error("--chunk-mib must be in (0, 4]")
    if args.size_mb <= 0 or args.repeat < 1:
        parser.error("--size-mb must be > 0 and --repeat >= 1")
    return args


def make_artifact(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = 8 * common.MIB
    with path.open("wb") as out:
        left = size
        while left:
            data = os.urandom(min(block, left))
            out.write(data)
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def local_copy(src: Path, dst: Path) -> tuple[float, float]:
    """(seconds for copyfile, seconds for reading the copy back + sha256)."""
    started = time.perf_counter()
    shutil.copyfile(src, dst)
    copied = time.perf_counter()
    digest = hashlib.sha256()
    with dst.open("rb", buffering=0) as handle:
        while data := handle.read(READ_BYTES):
            digest.update(data)
    hashed = time.perf_counter()
    dst.unlink()
    return copied - started, hashed - copied


async def upload(
    stub: Any, path: Path, size: int, sha256: str, chunk: int, deadline_s: float
) -> tuple[float, int]:
    async def messages() -> AsyncIterator[rpc.UploadModelVersionRequest]:
        yield rpc.UploadModelVersionRequest(
            header=rpc.UploadHeader(
                model=MODEL, create_model=True, sha256=sha256, size_bytes=size, format="bench"
            )
        )
        with path.open("rb", buffering=0) as handle:
            while data := handle.read(chunk):
                yield rpc.UploadModelVersionRequest(chunk=data)

    started = time.perf_counter()
    reply = await stub.UploadModelVersion(messages(), timeout=deadline_s)
    elapsed = time.perf_counter() - started
    if reply.model_version.size_bytes != size or reply.model_version.sha256 != sha256:
        raise RuntimeError(f"upload stored a different artifact: {reply.model_version}")
    return elapsed, reply.model_version.version


async def download(
    stub: Any, version: int, size: int, sha256: str, deadline_s: float
) -> tuple[float, int]:
    reference = model_reference_pb2.ModelReference(model=MODEL, version=version)
    chunks: list[bytes] = []
    metadata = None
    started = time.perf_counter()
    async for message in stub.DownloadModelVersion(
        rpc.DownloadModelVersionRequest(reference=reference), timeout=deadline_s
    ):
        if message.WhichOneof("content") == "model_version":
            metadata = message.model_version
        else:
            chunks.append(message.chunk)
    elapsed = time.perf_counter() - started
    digest = hashlib.sha256()
    for data in chunks:
        digest.update(data)
    received = sum(map(len, chunks))
    if metadata is None or received != size or digest.hexdigest() != sha256:
        raise RuntimeError(
            f"download mismatch: {received} bytes, sha256 {digest.hexdigest()}, "
            f"expected {size} bytes, {sha256}"
        )
    return elapsed, len(chunks)


async def main(args: argparse.Namespace) -> int:
    size = int(args.size_mb * common.MB)
    chunk = int(args.chunk_mib * common.MIB)
    timeout = max(120.0, size / (2 * common.MB))  # generous: 2 MB/s floor
    async with common.running_mesh(args) as (mesh, ready, workdir):
        envoy_target = ready["address"]
        direct_target = f"127.0.0.1:{ready['services']['registry']['port']}"
        source, copy_path = workdir / "artifact.bin", workdir / "artifact.copy"
        t0 = time.perf_counter()
        sha256 = await asyncio.to_thread(make_artifact, source, size)
        print(
            f"artifact: {size / common.MB:.0f} MB ({size} bytes), sha256 {sha256[:16]}..., "
            f"generated in {time.perf_counter() - t0:.1f}s; chunk {chunk} bytes; "
            f"envoy {envoy_target}, direct {direct_target}",
            flush=True,
        )

        meter = common.CpuMeter(common.mesh_pids(mesh))
        modes = [
            "copy",
            "copy+sha256",
            "read+sha256",
            "upload envoy",
            "upload direct",
            "download envoy",
            "download direct",
        ]
        seconds: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, dict[str, float]] = {}
        details: dict[str, list[Any]] = {m: [] for m in modes}

        def add_cpu(mode: str, delta: dict[str, float]) -> None:
            total = cpu.setdefault(mode, {})
            for name, value in delta.items():
                total[name] = round(total.get(name, 0.0) + value, 3)

        async with (
            common.channel(envoy_target, api_key=mesh.admin_key()) as envoy_ch,
            common.channel(direct_target, api_key=mesh.admin_key()) as direct_ch,
        ):
            stubs = {
                "envoy": registry_service_pb2_grpc.RegistryServiceStub(envoy_ch),
                "direct": registry_service_pb2_grpc.RegistryServiceStub(direct_ch),
            }
            first_version = None
            for run in range(args.repeat):
                before = meter.sample()
                copy_s, hash_s = await asyncio.to_thread(local_copy, source, copy_path)
                add_cpu("copy+sha256", meter.delta(before, meter.sample()))
                seconds["copy"].append(copy_s)
                seconds["copy+sha256"].append(copy_s + hash_s)
                seconds["read+sha256"].append(hash_s)
                order = ("envoy", "direct") if run % 2 == 0 else ("direct", "envoy")
                for route in order:
                    before = meter.sample()
                    elapsed, version = await upload(
                        stubs[route], source, size, sha256, chunk, timeout
                    )
                    add_cpu(f"upload {route}", meter.delta(before, meter.sample()))
                    seconds[f"upload {route}"].append(elapsed)
                    details[f"upload {route}"].append({"version": version})
                    first_version = first_version or version
                    print(
                        f"  run {run + 1}: upload {route:6s} "
                        f"{size / elapsed / common.MB:8.1f} MB/s (v{version})",
                        flush=True,
                    )
                for route in order:
                    assert first_version is not None
                    before = meter.sample()
                    elapsed, messages = await download(
                        stubs[route], first_version, size, sha256, timeout
                    )
                    add_cpu(f"download {route}", meter.delta(before, meter.sample()))
                    seconds[f"download {route}"].append(elapsed)
                    details[f"download {route}"].append({"messages": messages})
                    print(
                        f"  run {run + 1}: download {route:6s} "
                        f"{size / elapsed / common.MB:6.1f} MB/s (sha256 ok)",
                        flush=True,
                    )
        stats = common.envoy_stats(
            mesh,
            [
                "cluster.registry.upstream_cx_total",
                "cluster.registry.upstream_rq_total",
                "cluster.registry.upstream_rq_retry",
                "cluster.registry.upstream_flow_control",
                "http.ingress.downstream_flow_control",
                "cluster.registry.upstream_cx_rx_bytes_total",
                "cluster.registry.upstream_cx_tx_bytes_total",
            ],
        )

    mbps = {m: [size / s / common.MB for s in seconds[m]] for m in modes}
    med = {m: common.median(mbps[m]) for m in modes}
    copy, copy_sha = med["copy"], med["copy+sha256"]
    rows = []
    for m in modes:
        rows.append(
            [
                m,
                med[m],
                min(mbps[m]),
                max(mbps[m]),
                common.median(seconds[m]),
                med[m] / copy,
                med[m] / copy_sha,
            ]
        )
    print()
    print(
        f"registry artifact throughput, {size / common.MB:.0f} MB, chunk "
        f"{chunk / common.MIB:g} MiB, median of {args.repeat} (MB = 10^6 bytes)"
    )
    print(common.table(["mode", "MB/s", "min", "max", "seconds", "x copy", "x copy+sha"], rows))
    ratios = {
        "upload_envoy/copy": med["upload envoy"] / copy,
        "upload_envoy/copy+sha256": med["upload envoy"] / copy_sha,
        "download_envoy/copy": med["download envoy"] / copy,
        "upload_direct/copy+sha256": med["upload direct"] / copy_sha,
        "download_direct/copy": med["download direct"] / copy,
        "upload_envoy/upload_direct": med["upload envoy"] / med["upload direct"],
        "download_envoy/download_direct": med["download envoy"] / med["download direct"],
    }
    print()
    print(common.table(["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    print()
    print("CPU seconds summed over the runs (client = this process incl. gRPC threads):")
    names = sorted({n for d in cpu.values() for n in d})
    print(
        common.table(
            ["mode", *names],
            [[m, *[d.get(n, float("nan")) for n in names]] for m, d in cpu.items()],
        )
    )
    payload = {
        "benchmark": NAME,
        "params": {
            "size_bytes": size,
            "chunk_bytes": chunk,
            "repeat": args.repeat,
            "download_chunk_bytes": "registry setting (default 1 MiB)",
        },
        "environment": common.environment(args),
        "median_mb_per_s": med,
        "runs_mb_per_s": mbps,
        "runs_seconds": seconds,
        "ratios": ratios,
        "cpu_seconds": cpu,
        "details": details,
        "envoy_stats": stats,
    }
    print(f"\nresults: {common.write_json(NAME, args, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

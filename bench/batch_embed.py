"""Batch inference (issue 14): MiniLM embeddings of a parquet of sentences
through the batch service, against one process calling the model directly,
in the same run; and optionally the same job on a two-node local Ray cluster.

    .venv/bin/python bench/batch_embed.py [--rows 20000] [--concurrency 2] \\
        [--batch-size 64] [--two-node] [--node-cpus N] [--skip-direct]

In order, each with the machine to itself:

1. Writes ``--rows`` sentences (``mlmesh_batch.demo.write_sentences``: columns
   ``id``, ``text``) to a parquet file under a temp folder, the services'
   allowed root.
2. ``direct``: ``SentenceEncoder`` (the code the minilm build serves) loaded
   in this process from ``minilm_folder()``, torch threads = the core count,
   encoding the texts in input order, 32 per call. Load and encode are timed
   apart; rows/s is encode only. Nothing else runs yet (no registry, no Ray).
3. ``service``: a real registry in process with the minilm build registered
   as ``minilm@champion``, and the batch service in process (its own local
   Ray head, started on its first job). A 64-row warm-up job first: its wall
   time is the cold start, and its ``start_time - create_time`` is about the
   local head's start (the supervisor starts the head before the driver).
   Then the measured job: one EMBED stage (``minilm@champion``, in process,
   ``--batch-size`` rows per model call, ``--concurrency`` actors), no kept
   columns. Followed with WatchJob; measured on the client from just before
   CreateJob. The output is checked: one row per input, no id twice, 384-d
   vectors, and (with ``direct``) a sample equal to the direct vectors.
4. ``--two-node``: the local service is stopped (and its head), then two Ray
   nodes are started on this machine with ``ray start --block`` (token auth,
   ``--node-cpus`` scheduling slots each: by default the local head's slots,
   cores + 2, split in two), a second batch service is pointed at them
   (``ray_address``, ``ray_token_file``), and the warm-up and measured jobs
   run again. Time to ready: from ``ray start --head`` to both nodes alive
   in the GCS. The model actors' nodes are read from the GCS afterwards.

Figures per job: ``first row`` (client: CreateJob to the first WatchJob
snapshot with rows written), ``first part`` (the driver's own
``first_part_seconds``: from the driver's start to its first committed
part), ``driver`` (the service's clock: the driver's
launch to the final state), ``total`` (CreateJob to the final state),
rows/s = rows / total,
steady rows/s = rows after the first snapshot with rows / the time after it;
and each rate over the direct encode rate (the aim: at least 0.9x). Writes
``bench/results/batch_embed.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlmesh.batch.v1 import batch_pb2 as pb
from mlmesh.batch.v1 import batch_service_pb2 as rpc
from mlmesh.batch.v1 import batch_service_pb2_grpc
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_BATCH
from mlmesh_batch.config import BatchSettings
from mlmesh_batch.demo import sentences, write_sentences
from mlmesh_batch.server import build_server
from mlmesh_chassis.server import ServiceHost
from mlmesh_chassis.testing import bootstrap_keys_file, keyed_channel
from mlmesh_registry.testing import start_test_registry
from mlmesh_triton import build

NAME = "batch_embed"
DIM = 384
DIRECT_BATCH = 32
WARMUP_ROWS = 64
# Output rows compared with the direct vectors (spread over the input).
CHECK_SAMPLE = 200
# Seconds `ray start --block` has to stop its node (it drains first).
NODE_STOP_S = 45.0

# Run in a subprocess with the cluster's token in its environment: the
# times (time.time()) at which 1, 2, ... nodes were first seen alive in the
# GCS. The bench process itself never imports Ray.
NODES_POLL = r"""
import json, socket, sys, time
from ray._raylet import GcsClient
host, port = sys.argv[1].rsplit(":", 1)
want, deadline = int(sys.argv[2]), time.time() + float(sys.argv[3])
seen, client, alive = {}, None, 0
while time.time() < deadline and alive < want:
    try:
        if client is None:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            client = GcsClient(address=sys.argv[1])
        nodes = client.get_all_node_info(timeout=2).values()
        alive = sum(1 for n in nodes if n.state == 0)
        for count in range(1, alive + 1):
            seen.setdefault(count, time.time())
    except Exception:
        pass
    time.sleep(0.1)
print(json.dumps({"alive": alive, "first_seen": seen}))
"""

# The actors the jobs ran, per node (class name -> node id -> count).
ACTORS = r"""
import asyncio, collections, json, sys
from ray._raylet import GcsClient

async def main():
    client = GcsClient(address=sys.argv[1])
    nodes = client.get_all_node_info(timeout=10).values()
    actors = await client.async_get_all_actor_info(timeout=10)
    found = collections.defaultdict(collections.Counter)
    for actor in actors.values():
        # A dead actor of an earlier job may no longer name its node.
        found[actor.class_name][actor.node_id.hex()[:12] or "unknown"] += 1
    return {"nodes": [n.node_id.hex()[:12] for n in nodes], "actors": found}

print(json.dumps(asyncio.run(main())))
"""


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cpus = os.cpu_count() or 1
    parser.add_argument("--rows", type=int, default=20_000, help="sentences (default 20000)")
    parser.add_argument(
        "--concurrency", type=int, default=2, help="model actors of the job (default 2)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="rows per model call in the job (default 64)"
    )
    parser.add_argument(
        "--two-node", action="store_true", help="also run the job on a two-node local cluster"
    )
    parser.add_argument(
        "--node-cpus",
        type=int,
        default=max(1, -(-(cpus + 2) // 2)),
        help="Ray scheduling slots per node with --two-node (default: (cores + 2) / 2, "
        "the local head's cores + 2 split in two)",
    )
    parser.add_argument("--skip-direct", action="store_true", help="no direct baseline (no ratios)")
    parser.add_argument(
        "--job-timeout", type=float, default=1800.0, help="seconds one job may take"
    )
    parser.add_argument(
        "--tmpdir", type=Path, default=None, help="where the temp folder goes (default $TMPDIR)"
    )
    parser.add_argument(
        "--keep-state", action="store_true", help="keep the temp folder (logs, outputs)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=3600.0, help="hard limit for the whole run"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON results path")
    parser.add_argument("-v", "--verbose", action="store_true", help="service logs on stderr")
    return parser.parse_args()


# ---- the direct baseline ---------------------------------------------------


SORTED_BATCH = 64


def run_direct(texts: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    """The model called in this process: (figures, the vectors in input order)."""
    import torch
    from mlmesh_triton.sentence_encoder import SentenceEncoder

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    started = time.perf_counter()
    encoder = SentenceEncoder(str(build.minilm_folder()))
    load_s = time.perf_counter() - started
    chunks = []
    encode_started = time.perf_counter()
    for start in range(0, len(texts), DIRECT_BATCH):
        vectors, _ = encoder.encode(texts[start : start + DIRECT_BATCH])
        chunks.append(vectors)
    encode_s = time.perf_counter() - encode_started
    # The same trick the service's actors use, for a fair ratio: each block
    # of 4 x 64 texts sorted by length, then encoded 64 at a time.
    sorted_started = time.perf_counter()
    for start in range(0, len(texts), 4 * SORTED_BATCH):
        block = sorted(texts[start : start + 4 * SORTED_BATCH], key=len)
        for first in range(0, len(block), SORTED_BATCH):
            encoder.encode(block[first : first + SORTED_BATCH])
    sorted_s = time.perf_counter() - sorted_started
    del encoder
    gc.collect()
    figures = {
        "threads": threads,
        "batch_size": DIRECT_BATCH,
        "load_s": load_s,
        "encode_s": encode_s,
        "rows_per_s": len(texts) / encode_s,
        "total_s": load_s + encode_s,
        "total_rows_per_s": len(texts) / (load_s + encode_s),
        "sorted_batch_size": SORTED_BATCH,
        "sorted_encode_s": sorted_s,
        "sorted_rows_per_s": len(texts) / sorted_s,
    }
    return figures, np.concatenate(chunks)


# ---- the services ----------------------------------------------------------


@dataclass
class Registry:
    host: ServiceHost
    target: str
    secret: str


@dataclass
class Batch:
    host: ServiceHost
    channel: Any
    stub: batch_service_pb2_grpc.BatchServiceStub
    settings: BatchSettings


async def start_registry(root: Path) -> Registry:
    """The registry in process with minilm@champion (as the deployer registers it)."""
    (root / "registry").mkdir(parents=True)
    host, secret = await start_test_registry(root / "registry")
    target = f"127.0.0.1:{host.port}"
    os.environ["MLMESH_API_KEY"] = secret  # build.register's client
    try:
        folder = await asyncio.to_thread(build.build_minilm, root / "builds" / "minilm")
        await build.register(target, "minilm", folder)
    finally:
        os.environ.pop("MLMESH_API_KEY", None)
    return Registry(host, target, secret)


def batch_settings(
    root: Path, registry: Registry, data: Path, **extra: Any
) -> tuple[BatchSettings, str]:
    """The service's settings (its own folder and key, ``data`` its one
    allowed root; the rest its defaults) and its key's secret."""
    root.mkdir(parents=True)
    keys, secret = bootstrap_keys_file(root, [PLATFORM_SERVICE_BATCH])
    key_file = root / "service.key"
    key_file.write_text(registry.secret)
    settings = BatchSettings(
        port=0,
        metrics_port=-1,
        drain_seconds=0.0,
        grace_seconds=1.0,
        bootstrap_keys_file=keys,
        service_key_file=key_file,
        root=root / "batch",
        registry_target=registry.target,
        allowed_roots=str(data),
        **extra,
    )
    return settings, secret


async def start_batch(root: Path, registry: Registry, data: Path, **extra: Any) -> Batch:
    """The batch service in process."""
    settings, secret = await asyncio.to_thread(batch_settings, root, registry, data, **extra)
    host = await build_server(settings)
    channel = keyed_channel(f"127.0.0.1:{host.port}", secret)
    await channel.__aenter__()
    return Batch(host, channel, batch_service_pb2_grpc.BatchServiceStub(channel), settings)


async def stop_batch(batch: Batch) -> None:
    with contextlib.suppress(Exception):
        await batch.channel.close()
    # The local head stops with it (the supervisor's close).
    await asyncio.wait_for(batch.host.shutdown(), 120)


# ---- one job -----------------------------------------------------------------


def job_spec(source: Path, output: Path, args: argparse.Namespace) -> pb.Job:
    return pb.Job(
        display_name="bench",
        input_uri=f"file://{source}",
        input_format=pb.DATA_FORMAT_PARQUET,
        id_column="id",
        stages=[
            pb.Stage(
                name="embed",
                model=pb.ModelStage(
                    model=ModelReference(model="minilm", alias="champion"),
                    task=pb.TASK_EMBED,
                    input_column="text",
                    output_column="embedding",
                    batch_size=args.batch_size,
                    concurrency=args.concurrency,
                ),
            )
        ],
        output_uri=f"file://{output}",
    )


def _seconds_between(start: Any, end: Any) -> float:
    if not start.seconds or not end.seconds:
        return float("nan")
    return (end.ToNanoseconds() - start.ToNanoseconds()) / 1e9


async def run_job(stub: Any, spec: pb.Job, limit_s: float) -> dict[str, Any]:
    """Submits ``spec`` and follows it to its end; the client's and the
    service's figures."""
    started = time.perf_counter()
    created = await stub.CreateJob(rpc.CreateJobRequest(job=spec), timeout=120)
    accepted_s = time.perf_counter() - started
    name = created.operation.name
    first_row_s, first_rows = float("nan"), 0
    timeline: list[list[float]] = []
    last = None
    try:
        async with asyncio.timeout(limit_s):
            async for update in stub.WatchJob(rpc.WatchJobRequest(name=name)):
                now = time.perf_counter() - started
                last = update.job
                done = last.progress.rows_done
                timeline.append([round(now, 3), done])
                if done and first_rows == 0:
                    first_row_s, first_rows = now, done
    except TimeoutError:
        with contextlib.suppress(Exception):
            await stub.CancelJob(rpc.CancelJobRequest(name=name), timeout=30)
        raise RuntimeError(f"{name} did not end in {limit_s:.0f} s") from None
    total_s = time.perf_counter() - started
    assert last is not None
    progress = last.progress
    after = total_s - first_row_s
    steady = (progress.rows_done - first_rows) / after if after > 0 else float("nan")
    return {
        "job": name,
        "state": pb.JobState.Name(last.state),
        "error": last.error.message,
        "attempts": last.attempts,
        "rows_total": progress.rows_total,
        "rows_done": progress.rows_done,
        "rows_failed": progress.rows_failed,
        "parts": progress.parts,
        "accepted_s": accepted_s,
        "first_row_s": first_row_s,
        "first_row_rows": first_rows,
        "first_part_s_driver": progress.first_part_seconds,
        "total_s": total_s,
        "rows_per_s": progress.rows_done / total_s,
        "steady_rows_per_s": steady,
        # Server clocks: submission to the driver's launch (the local head's
        # start, on a first job), and the driver's launch to the final state.
        "queued_s": _seconds_between(last.create_time, last.start_time),
        "driver_s": _seconds_between(last.start_time, last.end_time),
        "stages": [
            {"name": s.name, "busy_s": s.busy_seconds, "model_version": s.model_version}
            for s in progress.stages
        ],
        "timeline": timeline,
    }


def check_output(output: Path, rows: int, direct: np.ndarray | None) -> dict[str, Any]:
    """Every input row once, 384-d vectors, and (with direct vectors) a
    sample equal to them."""
    parts = sorted(output.glob("part-*.parquet"))
    table = (
        pa.concat_tables([pq.read_table(p, columns=["id", "embedding"]) for p in parts])
        if parts
        else pa.table({"id": pa.array([], pa.string())})
    )
    ids = table.column("id").to_pylist()
    check: dict[str, Any] = {
        "rows": len(ids),
        "unique_ids": len(set(ids)),
        "expected_ids": set(ids) == {f"s{i:07d}" for i in range(rows)},
        "errors_parts": len(list((output / "_errors").glob("part-*.jsonl"))),
    }
    if table.num_rows:
        flat = table.column("embedding").combine_chunks().flatten()
        vectors = np.asarray(flat, dtype=np.float32).reshape(table.num_rows, -1)
        check["dim"] = vectors.shape[1]
        if direct is not None:
            sample = np.linspace(0, len(ids) - 1, min(CHECK_SAMPLE, len(ids))).astype(int)
            index = [int(ids[i][1:]) for i in sample]
            cosine = np.sum(vectors[sample] * direct[index], axis=1)
            check["min_cosine_vs_direct"] = float(cosine.min())
    check["ok"] = bool(
        check["rows"] == rows
        and check["unique_ids"] == rows
        and check["expected_ids"]
        and check.get("dim") == DIM
        and check.get("min_cosine_vs_direct", 1.0) >= 0.999
    )
    return check


async def jobs_on(
    batch: Batch, data: Path, label: str, rows: int, direct: np.ndarray | None, args: Any
) -> dict[str, Any]:
    """The warm-up job, then the measured one, on a started service."""
    warmup = await run_job(
        batch.stub,
        job_spec(data / "warmup.parquet", data / f"out-{label}-warmup", args),
        args.job_timeout,
    )
    print(f"{label}: warm-up {warmup['state']} in {warmup['total_s']:.1f} s", file=sys.stderr)
    if warmup["state"] != "JOB_STATE_SUCCEEDED":
        raise RuntimeError(f"{label}: the warm-up job ended {warmup['state']}: {warmup['error']}")
    load = os.getloadavg()
    job = await run_job(
        batch.stub,
        job_spec(data / "sentences.parquet", data / f"out-{label}", args),
        args.job_timeout,
    )
    job["load_before"] = load
    job["load_after"] = os.getloadavg()
    job["check"] = await asyncio.to_thread(check_output, data / f"out-{label}", rows, direct)
    print(
        f"{label}: {job['state']} in {job['total_s']:.1f} s, check ok={job['check']['ok']}",
        file=sys.stderr,
    )
    return {"cold_start": warmup, "job": job}


# ---- the two-node cluster ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TwoNodes:
    folder: Path
    address: str
    token: Path
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]]


def _spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as logfile:
        return subprocess.Popen(
            command, stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_two_nodes(folder: Path, cpus: int, timeout_s: float = 180.0) -> tuple[TwoNodes, dict]:
    """A head and a worker node on this machine (token auth, ports of their
    own so they clash with no other Ray on it); (the cluster, its timings)."""
    folder.mkdir(parents=True)
    token = folder / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    ray = str(Path(sys.executable).with_name("ray"))
    common_flags = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}"]
    # One temp dir for both nodes: the session's logs stay in the bench's
    # folder, and Ray's default /tmp/ray (other heads') is left alone.
    temp = f"--temp-dir={folder / 'tmp'}"
    nodes = TwoNodes(folder, f"127.0.0.1:{port}", token, env, [])
    poller = subprocess.Popen(
        [sys.executable, "-c", NODES_POLL, nodes.address, "2", str(timeout_s)],
        stdout=subprocess.PIPE,
        env=env,
    )
    started = time.time()
    try:
        nodes.processes.append(
            _spawn(
                [
                    ray,
                    "start",
                    "--head",
                    *common_flags,
                    f"--port={port}",
                    "--include-dashboard=false",
                    "--disable-usage-stats",
                    f"--ray-client-server-port={_free_port()}",
                    f"--dashboard-agent-listen-port={_free_port()}",
                    temp,
                ],
                env,
                folder / "head.log",
            )
        )
        deadline = time.monotonic() + timeout_s
        while not _reachable(port):
            if nodes.processes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the head did not come up; see {folder / 'head.log'}")
            time.sleep(0.05)
        gcs_s = time.time() - started
        nodes.processes.append(
            _spawn(
                [
                    ray,
                    "start",
                    *common_flags,
                    f"--address={nodes.address}",
                    f"--dashboard-agent-listen-port={_free_port()}",
                    temp,
                ],
                env,
                folder / "worker.log",
            )
        )
        out, _ = poller.communicate(timeout=timeout_s + 30)
        seen = json.loads(out)
        if seen["alive"] < 2:
            raise RuntimeError(f"{seen['alive']} of 2 nodes came up; see {folder}/*.log")
    except BaseException:
        poller.kill()
        poller.wait()
        stop_two_nodes(nodes)
        raise
    first_seen = {int(k): v - started for k, v in seen["first_seen"].items()}
    timings = {
        "node_cpus": cpus,
        "head_gcs_s": gcs_s,
        "head_alive_s": first_seen.get(1, float("nan")),
        "ready_s": first_seen.get(2, float("nan")),
    }
    return nodes, timings


def stop_two_nodes(nodes: TwoNodes) -> None:
    """SIGINT to each `ray start --block` (it stops its raylet, GCS and
    workers; SIGTERM can sit for long), then SIGKILL to the group of one
    that did not stop."""
    for process in reversed(nodes.processes):
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in reversed(nodes.processes):
        try:
            process.wait(timeout=NODE_STOP_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def actors_per_node(nodes: TwoNodes) -> dict[str, Any]:
    """Where the cluster's actors ran (informative; errors are reported)."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", ACTORS, nodes.address],
            env=nodes.env,
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
        return json.loads(out)  # type: ignore[no-any-return]
    except subprocess.CalledProcessError as error:
        return {"error": error.stderr.decode(errors="replace")[-500:]}
    except (subprocess.SubprocessError, ValueError) as error:
        return {"error": str(error)[:300]}


# ---- the run -----------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    env = environment()
    workdir = Path(tempfile.mkdtemp(prefix="mlmesh-bench-", dir=args.tmpdir))
    data = workdir / "data"
    results: dict[str, Any] = {}
    registry: Registry | None = None
    batch: Batch | None = None
    nodes: TwoNodes | None = None
    try:
        started = time.perf_counter()
        write_sentences(data / "sentences.parquet", args.rows)
        write_sentences(data / "warmup.parquet", WARMUP_ROWS, seed=11)
        results["dataset"] = {"rows": args.rows, "write_s": time.perf_counter() - started}
        vectors = None
        if not args.skip_direct:
            print(f"direct: {args.rows} rows (load average {os.getloadavg()})", file=sys.stderr)
            results["direct"], vectors = run_direct(sentences(args.rows))
            print(f"direct: {results['direct']['rows_per_s']:.1f} rows/s", file=sys.stderr)

        started = time.perf_counter()
        registry = await start_registry(workdir)
        setup = {"registry_and_build_s": time.perf_counter() - started}
        started = time.perf_counter()
        batch = await start_batch(workdir / "service", registry, data)
        setup["service_start_s"] = time.perf_counter() - started
        results["service"] = {"setup": setup} | await jobs_on(
            batch, data, "service", args.rows, vectors, args
        )
        await stop_batch(batch)
        batch = None

        if args.two_node:
            started_nodes, timings = await asyncio.to_thread(
                start_two_nodes, workdir / "cluster", args.node_cpus
            )
            nodes = started_nodes
            print(f"two-node: ready in {timings['ready_s']:.1f} s", file=sys.stderr)
            batch = await start_batch(
                workdir / "service2",
                registry,
                data,
                ray_address=started_nodes.address,
                ray_token_file=started_nodes.token,
            )
            results["two_node"] = {"cluster": timings} | await jobs_on(
                batch, data, "two-node", args.rows, vectors, args
            )
            results["two_node"]["actors"] = await asyncio.to_thread(actors_per_node, started_nodes)
    finally:
        # Also on errors, Ctrl-C, SIGTERM and --max-seconds.
        if batch is not None:
            with contextlib.suppress(BaseException):
                await stop_batch(batch)
        if nodes is not None:
            await asyncio.to_thread(stop_two_nodes, nodes)
        if registry is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(registry.host.shutdown(), 60)
        if args.keep_state:
            print(f"state kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(report(results, args))
    path = common.write_json(
        NAME,
        args,
        {
            "environment": env,
            "args": vars(args) | {"tmpdir": str(args.tmpdir), "output": str(args.output)},
            "results": results,
        },
    )
    print(f"wrote {path}", file=sys.stderr)
    checks = [r["job"]["check"]["ok"] for k, r in results.items() if k in ("service", "two_node")]
    return 0 if all(checks) else 1


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    direct = results.get("direct")
    base = direct["rows_per_s"] if direct else float("nan")
    rows: list[list[Any]] = []
    lines_sorted: list[str] = []
    if direct:
        rows.append(
            [
                f"direct ({direct['threads']} threads, batch {DIRECT_BATCH})",
                direct["load_s"],
                "",
                "",
                "",
                direct["encode_s"],
                direct["rows_per_s"],
                "",
                1.0,
                "",
            ]
        )
    if direct:
        rows.append(
            [
                f"direct, length-sorted blocks (batch {SORTED_BATCH})",
                "",
                "",
                "",
                "",
                direct["sorted_encode_s"],
                direct["sorted_rows_per_s"],
                "",
                direct["sorted_rows_per_s"] / base,
                "",
            ]
        )
    for key, label in (("service", "service (local head)"), ("two_node", "service (two nodes)")):
        if key not in results:
            continue
        cold, job = results[key]["cold_start"], results[key]["job"]
        rows.append(
            [
                f"{label} c={args.concurrency} b={args.batch_size}",
                cold["total_s"],
                job["first_row_s"],
                job["first_part_s_driver"],
                job["driver_s"],
                job["total_s"],
                job["rows_per_s"],
                job["steady_rows_per_s"],
                job["rows_per_s"] / base,
                job["steady_rows_per_s"] / base,
            ]
        )
        if direct:
            job["x_direct_sorted"] = job["rows_per_s"] / direct["sorted_rows_per_s"]
            job["steady_x_direct_sorted"] = job["steady_rows_per_s"] / direct["sorted_rows_per_s"]
            lines_sorted.append(
                f"{label}: {job['x_direct_sorted']:.2f}x the length-sorted direct rate overall, "
                f"{job['steady_x_direct_sorted']:.2f}x steady"
            )
    headers = [
        "target",
        "load/cold s",
        "1st row s",
        "1st part s",
        "driver s",
        "total s",
        "rows/s",
        "steady rows/s",
        "x direct",
        "steady x direct",
    ]
    lines = [common.table(headers, rows), *lines_sorted]
    if "service" in results:
        cold = results["service"]["cold_start"]
        lines.append(f"local head start (warm-up queued_s): {cold['queued_s']:.1f} s")
    if "two_node" in results:
        cluster = results["two_node"]["cluster"]
        lines.append(
            f"two nodes ({cluster['node_cpus']} CPUs each): GCS up {cluster['head_gcs_s']:.1f} s,"
            f" head alive {cluster['head_alive_s']:.1f} s, both alive {cluster['ready_s']:.1f} s"
        )
        lines.append(f"actors: {json.dumps(results['two_node'].get('actors', {}))}")
    for key in ("service", "two_node"):
        if key in results:
            lines.append(f"{key} output check: {results[key]['job']['check']}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    return {
        "python": sys.version.split()[0],
        "ray": md.version("ray"),
        "torch": md.version("torch"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": os.getloadavg(),
    }


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))

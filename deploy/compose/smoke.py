"""The Compose smoke test's checks (scripts/compose-smoke.sh runs them with
the repository's .venv, on the host, against the containers' fixed ports).

    python deploy/compose/smoke.py wait  --timeout S
    python deploy/compose/smoke.py first --work DIR
    python deploy/compose/smoke.py again --work DIR

``wait``: until Envoy routes every cluster and every chassis service follows
the key directory (as the runner waits). ``first``: through Envoy, with the
admin key (env MLMESH_API_KEY, never an argument): create a key, and with it
Generate, Infer, Embed, read online features, search the demo vectors, run a
small batch job to SUCCEEDED; what it saw goes to DIR. ``again`` (after
`compose down` / `up`): the key still works, the registry has the same
versions, the collection the same points, the job is still SUCCEEDED.

Named without test_ so pytest does not collect it: it needs the containers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlmesh_runner.catalog import CATALOG, KEY_DIRECTORY_SERVICE
from mlmesh_runner.compose import ENVOY_ADMIN_PORT, ENVOY_PORT, PortPlan
from mlmesh_runner.envoy import healthy_clusters

ENVOY = f"127.0.0.1:{ENVOY_PORT}"
MLMESH = Path(sys.executable).with_name("mlmesh")
MODELS = ("tiny-llama", "digits", "minilm")
# The batch job's input: written into the batch service's volume by the
# smoke script (docker-compose exec), read by the service and Ray there.
BATCH_INPUT = "/state/batch/data/smoke/sentences.parquet"
BATCH_OUTPUT = "/state/batch/output/smoke"
SCOPES = ("GENERATE", "INFER", "EMBED", "FEATURES", "VECTORS", "BATCH", "REGISTRY_READ")


def say(text: str) -> None:
    print(f"smoke: {text}", flush=True)


def admin_json(path: str) -> Any:
    url = f"http://127.0.0.1:{ENVOY_ADMIN_PORT}{path}"
    with urllib.request.urlopen(url, timeout=3) as reply:
        return json.loads(reply.read())


async def serving(port: int, service: str) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


async def wait(timeout_s: float) -> None:
    """Envoy routes every cluster; every chassis service follows the key
    directory (its 'mlmesh.keys' health), so a key made now works anywhere."""
    plan = PortPlan.of(CATALOG)
    routed = {s.name for s in CATALOG if s.routed}
    keyed = [
        s.name
        for s in CATALOG
        if s.port_discovery == "port-file" and s.name != KEY_DIRECTORY_SERVICE
    ]
    deadline = time.monotonic() + timeout_s
    shown = 0.0
    while True:
        missing: list[str] = []
        try:
            missing += sorted(routed - healthy_clusters(admin_json("/clusters?format=json")))
        except OSError:
            missing.append("envoy (admin not answering)")
        if not missing:
            for name in keyed:
                if not await serving(plan.grpc[name], "mlmesh.keys"):
                    missing.append(f"{name} (keys not current)")
        if not missing:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"smoke: not ready after {timeout_s:.0f}s: {', '.join(missing)}")
        if time.monotonic() - shown > 15:
            say(f"waiting for: {', '.join(missing)}")
            shown = time.monotonic()
        await asyncio.sleep(1)


def cli(*argv: str, key: str, timeout: float = 120) -> str:
    """The `mlmesh` command line through Envoy; the key in its environment."""
    env = {**os.environ, "MLMESH_API_KEY": key, "MLMESH_TARGET": ENVOY}
    result = subprocess.run(
        [str(MLMESH), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(
            f"smoke: mlmesh {argv[0]} {argv[1] if len(argv) > 1 else ''} failed "
            f"({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return result.stdout


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def timed(name: str, timings: dict[str, float]):  # type: ignore[no-untyped-def]
    class Timer:
        def __enter__(self) -> None:
            self.start = time.monotonic()

        def __exit__(self, *exc: object) -> None:
            timings[name] = round(time.monotonic() - self.start, 1)
            if exc[0] is None:
                say(f"{name}: ok ({timings[name]}s)")

    return Timer()


async def vectors(key: str, seed_wait_s: float = 240) -> tuple[int, list[Any]]:
    """The demo collection's size and a SearchText's hits (waits for the
    demo to be seeded: the vector service does that once Triton serves)."""
    from mlmesh.vectors.v1 import vectors_service_pb2 as rpc
    from mlmesh.vectors.v1 import vectors_service_pb2_grpc
    from mlmesh_sdk.channel import mesh_channel

    async with mesh_channel(ENVOY, key) as channel:
        stub = vectors_service_pb2_grpc.VectorServiceStub(channel)
        deadline = time.monotonic() + seed_wait_s
        while True:
            try:
                count = (await stub.CountPoints(rpc.CountPointsRequest(collection="demo"))).count
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                count = 0
            if count > 0:
                break
            if time.monotonic() > deadline:
                raise SystemExit("smoke: the demo collection was not seeded")
            await asyncio.sleep(1)
        found = await stub.SearchText(
            rpc.SearchTextRequest(collection="demo", text="a handwritten seven", top_k=3)
        )
        return count, list(found.points)


def versions(key: str) -> dict[str, list[int]]:
    found = {}
    for model in MODELS:
        found[model] = sorted(
            int(r.get("version", 0))
            for r in records(cli("--json", "versions", "list", model, key=key))
        )
        if not found[model]:
            raise SystemExit(f"smoke: the registry has no version of {model}")
    return found


def digits_input() -> str:
    from mlmesh_triton.build import digits_training_data

    x, _ = digits_training_data()
    return "pixels=" + json.dumps(x[:1].astype("float32").tolist())


def check_key_works(key: str, timings: dict[str, float]) -> None:
    with timed("generate", timings):
        out = cli("generate", "tiny-llama@champion", "The model", "--max-tokens", "4", key=key)
        assert "completion tokens" in out, out
    with timed("infer", timings):
        out = cli("infer", "digits@champion", "--input", digits_input(), key=key)
        assert "argmax by row:" in out, out
    with timed("embed", timings):
        out = cli("embed", "minilm@champion", "a sentence", "another", key=key)
        assert "2 vectors of 384" in out, out
    with timed("features", timings):
        out = cli("features", "get", "fraud_model", "user_id=1", key=key)
        assert "spend_24h=" in out and "big_spender=" in out, out


def first(work: Path) -> dict[str, Any]:
    admin = os.environ.get("MLMESH_API_KEY", "")
    if not admin:
        raise SystemExit("smoke: MLMESH_API_KEY (the admin key) is not set")
    timings: dict[str, float] = {}
    with timed("create key", timings):
        argv = ["--json", "keys", "create", "compose smoke", "--model", "*"]
        for scope in SCOPES:
            argv += ["--scope", scope]
        created = records(cli(*argv, key=admin))[-1]
        key_id, secret = created["key"]["id"], created["secret"]
    check_key_works(secret, timings)
    with timed("search vectors", timings):
        count, points = asyncio.run(vectors(secret))
        assert points, "SearchText found nothing"
    with timed("batch job", timings):
        out = cli(
            "--json",
            "batch",
            "embed",
            "--input",
            BATCH_INPUT,
            "--output",
            BATCH_OUTPUT,
            "--model",
            "minilm@champion",
            key=secret,
            timeout=300,
        )
        job = records(out)[-1]
        job = job.get("job", job)
        assert job.get("state") == "JOB_STATE_SUCCEEDED", job
    with timed("registry versions", timings):
        seen = versions(secret)
    work.mkdir(parents=True, exist_ok=True)
    secret_file = work / "key"
    descriptor = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secret)
    state = {
        "key_id": key_id,
        "job": job.get("name", ""),
        "points": count,
        "versions": seen,
        "timings": timings,
    }
    (work / "first.json").write_text(json.dumps(state, indent=2))
    say(f"first pass: {json.dumps(state)}")
    return state


def again(work: Path) -> None:
    before = json.loads((work / "first.json").read_text())
    secret = (work / "key").read_text().strip()
    timings: dict[str, float] = {}
    check_key_works(secret, timings)  # the key made before the restart
    with timed("registry kept its versions", timings):
        seen = versions(secret)
        for model, numbers in before["versions"].items():
            assert set(numbers) <= set(seen[model]), (model, numbers, seen[model])
    with timed("collection kept its points", timings):
        count, _ = asyncio.run(vectors(secret, seed_wait_s=30))
        assert count >= before["points"], (count, before["points"])
    with timed("batch job still listed", timings):
        jobs = records(cli("--json", "batch", "list", key=secret))
        states = {j.get("name"): j.get("state") for j in (r.get("job", r) for r in jobs)}
        assert states.get(before["job"]) == "JOB_STATE_SUCCEEDED", states
    say(f"second pass: {json.dumps(timings)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    steps = parser.add_subparsers(dest="step", required=True)
    w = steps.add_parser("wait")
    w.add_argument("--timeout", type=float, default=600)
    for name in ("first", "again"):
        steps.add_parser(name).add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    if args.step == "wait":
        asyncio.run(wait(args.timeout))
    elif args.step == "first":
        first(args.work)
    else:
        again(args.work)


if __name__ == "__main__":
    main()

"""The same fake OpenAI-compatible backend called three ways in one run:
directly, through the gateway's OpenAI surface, and through LiteLLM proxy.

    .venv/bin/python bench/openai_gateway.py [--targets direct,gateway,litellm] [--envoy] \
        [--concurrency 1,32] [--requests 400] [--per-task 25] [--rounds 4] \
        [--tpm 6000] [--tpm-seconds 65] [--relay-streams 16] [--relay-tokens 1000]

Needs LiteLLM's own environment first: ``bash bench/litellm/setup.sh``.

The backend is ``mlmesh_gateway.fake_upstream`` (a fake: made-up tokens at no
cost, one token per SSE chunk) in its own process. Every request asks for
``max_tokens`` 64, so it answers 64 tokens with no delay; the relay phase asks
for ``--relay-tokens``. Targets, one aiohttp session (keep-alive connections)
each, all driven from this process (the client):

* ``direct``: the fake itself (``/v1`` with the fake's own API key);
* ``gateway``: the gateway's OpenAI surface on its own HTTP port, the model
  ``fake-64`` configured as an OpenAI-compatible upstream
  (``MLMESH_GATEWAY_OPENAI_UPSTREAMS``, no tokenizer: a byte bound is reserved
  and the upstream's usage billed), with a key made through KeyService
  (GENERATE, model pattern ``fake-64``, limits far above the run's use), the
  throttle in Redis (database 14, flushed before and after) and the usage
  ledger (SQLite in the mesh's state directory). The mesh runs the gateway
  alone (no registry, llm or Triton) behind Envoy;
* ``envoy`` (with ``--envoy``): the same gateway through Envoy's front door;
* ``litellm``: LiteLLM proxy (``bench/litellm/.venv``, the version pinned in
  ``bench/litellm/requirements.txt``) with one worker and no database:
  ``bench/litellm/config.yaml`` routes ``fake-64`` to the fake through its
  ``openai/`` provider; keys come from ``bench/litellm/bench_auth.py``
  (LiteLLM's custom_auth hook), the only way to give a key a TPM limit
  without LiteLLM's PostgreSQL (its in-memory rate limiter enforces it).

Phases:

1. Latency, per concurrency level and scenario (``nonstream``: the whole
   answer; ``stream``: time to the first content chunk, with
   ``stream_options.include_usage``): a warm-up, then ``max(--requests,
   --per-task x c)`` chat completions per target in ``--rounds`` rounds, the
   target order rotating each round; c closed-loop tasks. Every answer is
   checked (64 tokens, usage, ``[DONE]``). CPU of every process (client,
   fake, gateway, Envoy, Redis, LiteLLM) from ``/proc/<pid>/stat`` around each
   burst: CPU per request and per streamed chunk.
2. TPM accuracy: a fresh key with ``--tpm`` tokens per minute on the gateway
   and on LiteLLM, one after the other; ``--tpm-concurrency`` tasks send
   non-streaming requests (max_tokens 64) for ``--tpm-seconds``, pausing
   ``--tpm-pause-ms`` after a refusal. "used" = billed tokens (the answers'
   usage.total_tokens) of the admitted requests sent in the first 60 s over
   the limit (a fresh key: one full window; the aim is >= 0.97); "admitted"
   = the most billed tokens of admitted requests sent within any 60 s of the
   run, over the limit (the aim is <= 1.000; requests are timed when sent, so
   one or two requests at a window's edge can show as over).
3. Relay: ``--relay-streams`` concurrent streams of ``--relay-tokens``
   tokens, ``--relay-rounds`` times per target: chunks/s one gateway process
   relays, and CPU per chunk.

Writes bench/results/openai_gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import _common as common
import _gateway as gw
import _triton as tb
import aiohttp
import orjson
from mlmesh_runner.supervisor import listening_ports

NAME = "openai_gateway"
MODEL = "fake-64"
TOKENS = 64
REDIS_URL = "redis://127.0.0.1:6379/14"
LITELLM_DIR = common.BENCH_DIR / "litellm"
TARGET_NAMES = ("direct", "gateway", "envoy", "litellm")
SCENARIOS = ("nonstream", "stream")
CALL_TIMEOUT = 120.0
WINDOW_S = 60.0
START_TIMEOUT_S = 180.0
# The process(es) whose CPU is "the proxy's" for each target.
PROXY_PROCESSES = {
    "direct": (),
    "gateway": ("gateway",),
    "envoy": ("gateway", "envoy"),
    "litellm": ("litellm",),
}
AIM_ADDED_P50_MS = 1.0
AIM_GATEWAY_CPU_US = 1000.0
AIM_TIMES_LESS_THAN_LITELLM = 15.0
AIM_ADMITTED = 1.0
AIM_USED = 0.97
T = TypeVar("T")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--targets",
        default="direct,gateway,litellm",
        help="comma-separated, of direct, gateway, envoy, litellm (default "
        "direct,gateway,litellm; direct is always measured)",
    )
    parser.add_argument(
        "--envoy", action="store_true", help="also measure the gateway through Envoy"
    )
    parser.add_argument("--concurrency", default="1,32", help="levels (default 1,32)")
    parser.add_argument(
        "--requests", type=int, default=400, help="at least this many per target (default 400)"
    )
    parser.add_argument(
        "--per-task",
        type=int,
        default=25,
        help="requests per target = max(--requests, this x c) (default 25)",
    )
    parser.add_argument(
        "--warmup", type=int, default=40, help="warm-up requests per target (default 40)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds per phase (default 4)")
    parser.add_argument(
        "--scenarios", default="nonstream,stream", help="of nonstream, stream (default both)"
    )
    parser.add_argument(
        "--tpm", type=int, default=6000, help="the probe key's tokens per minute (default 6000)"
    )
    parser.add_argument(
        "--tpm-seconds", type=float, default=65.0, help="probe length (default 65; 0: skip)"
    )
    parser.add_argument("--tpm-concurrency", type=int, default=8, help="probe tasks (default 8)")
    parser.add_argument(
        "--tpm-pause-ms",
        type=float,
        default=100.0,
        help="a probe task's pause after a refusal (default 100)",
    )
    parser.add_argument(
        "--relay-streams", type=int, default=16, help="concurrent relay streams (default 16)"
    )
    parser.add_argument(
        "--relay-tokens", type=int, default=1000, help="tokens per relay stream (default 1000)"
    )
    parser.add_argument(
        "--relay-rounds", type=int, default=2, help="relay bursts per target (default 2; 0: skip)"
    )
    parser.add_argument(
        "--litellm-dir",
        type=Path,
        default=LITELLM_DIR,
        help="LiteLLM's folder: .venv, config.yaml, bench_auth.py (default bench/litellm)",
    )
    parser.add_argument(
        "--no-uvloop", action="store_true", help="the client on asyncio's own event loop"
    )
    common.add_common_args(parser)
    parser.set_defaults(max_seconds=1200.0)
    args = parser.parse_args()
    try:
        args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        parser.error("--concurrency must be comma-separated integers")
    targets = {t.strip() for t in args.targets.split(",") if t.strip()} | {"direct"}
    if args.envoy:
        targets.add("envoy")
    if targets - set(TARGET_NAMES):
        parser.error(f"--targets must name some of {', '.join(TARGET_NAMES)}")
    args.target_list = [t for t in TARGET_NAMES if t in targets]
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenario_list or set(args.scenario_list) - set(SCENARIOS):
        parser.error(f"--scenarios must name some of {', '.join(SCENARIOS)}")
    if not args.levels or min(args.levels) < 1 or args.rounds < 1:
        parser.error("concurrency levels and --rounds must be >= 1")
    if args.requests < args.rounds or args.tpm < 1 or args.tpm_concurrency < 1:
        parser.error("--requests must be >= --rounds; --tpm and --tpm-concurrency >= 1")
    if min(args.relay_streams, args.relay_tokens) < 1 or args.relay_tokens > 100_000:
        parser.error("--relay-streams >= 1 and --relay-tokens in [1, 100000]")
    return args


# --- processes ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def child_process(
    argv: Sequence[str], env: dict[str, str], log_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child in its own process group, stopped (the whole group) on exit."""
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 20)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def start_fake(
    stack: contextlib.AsyncExitStack, tmp: Path, api_key: str, tokens: int
) -> tuple[str, int]:
    """Starts the fake; returns (base URL, pid)."""
    port_file = tmp / "fake.port"
    log = tmp / "fake.log"
    env = {**os.environ, "FAKE_UPSTREAM_API_KEY": api_key}
    process = await stack.enter_async_context(
        child_process(
            [
                sys.executable,
                "-m",
                "mlmesh_gateway.fake_upstream",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--tokens",
                str(tokens),
                "--models",
                MODEL,
            ],
            env,
            log,
        )
    )
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the fake upstream did not start:\n{_tail(log)}")
        await asyncio.sleep(0.05)
    return f"http://127.0.0.1:{int(port_file.read_text())}/v1", process.pid


async def start_litellm(
    stack: contextlib.AsyncExitStack,
    tmp: Path,
    litellm_dir: Path,
    fake_url: str,
    fake_key: str,
    keys: dict[str, str],
    tpm: int,
) -> tuple[str, int]:
    """Starts LiteLLM proxy with one worker on a free port; returns (base URL, pid)."""
    binary = litellm_dir / ".venv" / "bin" / "litellm"
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: run bash bench/litellm/setup.sh first")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLMESH_", "VIRTUAL_ENV", "PYTHONPATH"))
    }
    env.update(
        {
            "LITELLM_MASTER_KEY": "sk-" + secrets.token_hex(32),
            # The model cost map ships in the package: do not fetch it.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "FAKE_UPSTREAM_BASE": fake_url,
            "FAKE_UPSTREAM_API_KEY": fake_key,
            "BENCH_LITELLM_KEY": keys["plain"],
            "BENCH_LITELLM_TPM_KEY": keys["tpm"],
            "BENCH_LITELLM_TPM": str(tpm),
            "PYTHONUNBUFFERED": "1",
            # The fake's chunks are all "tok ": LiteLLM ends a stream whose
            # content repeats 100 times ("The model is repeating the same
            # chunk") unless this is raised.
            "REPEATED_STREAMING_CHUNK_LIMIT": "100000000",
        }
    )
    log = tmp / "litellm.log"
    argv = [
        str(binary),
        "--config",
        str(litellm_dir / "config.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--num_workers",
        "1",
    ]
    process = await stack.enter_async_context(child_process(argv, env, log))
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while True:
            if process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"LiteLLM did not start:\n{_tail(log)}")
            for port in sorted(listening_ports(process.pid)):
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        f"http://127.0.0.1:{port}/health/liveliness",
                        timeout=aiohttp.ClientTimeout(total=2),
                    ) as reply:
                        if reply.status == 200:
                            return f"http://127.0.0.1:{port}/v1", process.pid
            await asyncio.sleep(0.5)


def litellm_pids(pid: int) -> dict[str, int]:
    """LiteLLM's process and any children it started (their CPU is LiteLLM's too)."""
    out = {"litellm": pid}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out[f"litellm:{entry.name}"] = int(entry.name)
    return out


def flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


def redis_keys() -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        return sum(1 for _ in client.scan_iter("mlmesh:throttle:*"))
    finally:
        client.close()


async def gateway_key(target: str, admin_key: str, name: str, tokens_per_minute: int) -> str:
    """A GENERATE key for fake-64 made through KeyService (gRPC, via Envoy)."""
    from mlmesh.gateway.v1 import gateway_pb2, key_service_pb2_grpc
    from mlmesh.gateway.v1 import key_service_pb2 as key_rpc

    key = gateway_pb2.Key(
        display_name=name,
        scopes=gateway_pb2.KeyScopes(
            model_patterns=[MODEL], services=[gateway_pb2.PLATFORM_SERVICE_GENERATE]
        ),
        limits=gateway_pb2.KeyLimits(
            requests_per_minute=gw.BIG,
            tokens_per_minute=tokens_per_minute,
            max_concurrent_streams=gw.MAX_STREAMS,
        ),
    )
    async with common.channel(target) as channel:
        reply = await key_service_pb2_grpc.KeyServiceStub(channel).CreateKey(
            key_rpc.CreateKeyRequest(key=key),
            metadata=(("authorization", f"Bearer {admin_key}"),),
            timeout=gw.CALL_TIMEOUT,
        )
    return str(reply.secret)


# --- the client -------------------------------------------------------------------


class Target:
    """One way to the backend: a base URL, a key, one keep-alive session."""

    def __init__(self, name: str, base_url: str, api_key: str, connections: int) -> None:
        self.name = name
        self.base_url = base_url
        self.api_key = api_key
        self.chat_url = base_url + "/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=connections, limit_per_host=connections, keepalive_timeout=300
            ),
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
        )

    async def close(self) -> None:
        await self.session.close()


def chat_body(i: int, stream: bool, max_tokens: int = TOKENS) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"bench request {i} says hello"}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


class Burst:
    """Closed-loop calls; ``latencies`` are whole answers (non-streaming) or
    times to the first content chunk (streaming), in ns."""

    def __init__(self) -> None:
        self.latencies: list[int] = []
        self.durations: list[int] = []
        self.chunks = 0
        self.tokens = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.wrong: collections.Counter[str] = collections.Counter()
        self.first_error = ""
        self.seconds = 0.0

    async def run(
        self,
        target: Target,
        stream: bool,
        total: int,
        concurrency: int,
        start: int,
        max_tokens: int = TOKENS,
    ) -> None:
        next_index = start
        end = start + total

        async def worker() -> None:
            nonlocal next_index
            while next_index < end:
                i = next_index
                next_index += 1
                body = chat_body(i, stream, max_tokens)
                started = time.perf_counter_ns()
                try:
                    if stream:
                        first, problem = await self._stream(target, body, started, max_tokens)
                    else:
                        problem = await self._whole(target, body, max_tokens)
                        first = time.perf_counter_ns() - started
                except Exception as error:  # counted, not fatal
                    self.errors[type(error).__name__] += 1
                    self.first_error = self.first_error or f"{type(error).__name__}: {error}"
                    continue
                self.durations.append(time.perf_counter_ns() - started)
                if problem:
                    self.wrong[problem] += 1
                    self.first_error = self.first_error or problem
                    continue
                self.latencies.append(first)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
        self.seconds += time.perf_counter() - began

    async def _whole(self, target: Target, body: bytes, max_tokens: int) -> str | None:
        async with target.session.post(target.chat_url, data=body, headers=target.headers) as r:
            raw = await r.read()
            if r.status != 200:
                return f"http {r.status}: {raw[:120]!r}"
        reply = orjson.loads(raw)
        self.chunks += 1
        text = reply["choices"][0]["message"]["content"] or ""
        tokens = text.count("tok")
        self.tokens += tokens
        if tokens != max_tokens:
            return f"{tokens} tokens"
        usage = reply.get("usage") or {}
        if usage.get("completion_tokens") != max_tokens:
            return "usage"
        return None

    async def _stream(
        self, target: Target, body: bytes, started: int, max_tokens: int
    ) -> tuple[int, str | None]:
        first = 0
        tokens = chunks = 0
        usage: dict[str, Any] | None = None
        done = False
        async with target.session.post(target.chat_url, data=body, headers=target.headers) as r:
            if r.status != 200:
                raw = await r.read()
                return 0, f"http {r.status}: {raw[:120]!r}"
            async for line in r.content:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                chunk = orjson.loads(payload)
                chunks += 1
                if "error" in chunk:
                    return 0, f"error event: {str(chunk['error'])[:120]}"
                choices = chunk.get("choices")
                if choices:
                    content = (choices[0].get("delta") or {}).get("content")
                    if content:
                        if not first:
                            first = time.perf_counter_ns() - started
                        tokens += content.count("tok")
                if chunk.get("usage"):
                    usage = chunk["usage"]
        self.chunks += chunks
        self.tokens += tokens
        if not done:
            return 0, "no [DONE]"
        if tokens != max_tokens:
            return 0, f"{tokens} tokens"
        if usage is None or usage.get("completion_tokens") != max_tokens:
            return 0, "usage"
        return first, None


def summarize(burst: Burst, cpu: dict[str, float]) -> dict[str, Any]:
    ms = sorted(v / 1e6 for v in burst.latencies)
    done = len(ms)
    whole = sorted(v / 1e6 for v in burst.durations)
    return {
        "ok": done,
        "errors": dict(burst.errors),
        "wrong": dict(burst.wrong),
        "first_error": burst.first_error,
        "seconds": round(burst.seconds, 3),
        "rps": done / burst.seconds if burst.seconds else float("nan"),
        "p50_ms": common.percentile(ms, 50),
        "p90_ms": common.percentile(ms, 90),
        "p99_ms": common.percentile(ms, 99),
        "mean_ms": sum(ms) / done if done else float("nan"),
        "max_ms": ms[-1] if ms else float("nan"),
        "whole_p50_ms": common.percentile(whole, 50),
        "chunks": burst.chunks,
        "chunks_per_request": burst.chunks / done if done else float("nan"),
        "chunks_per_s": burst.chunks / burst.seconds if burst.seconds else float("nan"),
        "cpu_seconds": cpu,
        "cpu_us_per_request": {
            k: round(v / done * 1e6, 1) if done else None for k, v in cpu.items()
        },
        "cpu_us_per_chunk": {
            k: round(v / burst.chunks * 1e6, 2) if burst.chunks else None for k, v in cpu.items()
        },
        "other_cores": gw.other_cores(cpu, burst.seconds),
    }


def proxy_cpu(target: str, per: dict[str, float | None]) -> float:
    """The proxy's CPU (us) from a per-request or per-chunk dict, children included."""
    names = PROXY_PROCESSES[target]
    total = 0.0
    for key, value in per.items():
        if value is not None and (key in names or key.split(":", 1)[0] in names):
            total += value
    return round(total, 2) if names else float("nan")


def rotate(items: Sequence[str], r: int) -> list[str]:
    k = r % len(items)
    return [*items[k:], *items[:k]]


async def measured(
    meter: common.CpuMeter,
    disturbance: gw.DisturbanceLog,
    cpu: dict[str, float],
    work: Awaitable[T],
) -> T:
    """Awaits ``work`` (a coroutine not started yet), adding the CPU it took to ``cpu``."""
    disturbance.check()
    before = meter.sample()
    result = await work
    tb.add_cpu(cpu, meter.delta(before, meter.sample()))
    return result


# --- the TPM probe ------------------------------------------------------------------


async def tpm_probe(target: Target, limit: int, args: argparse.Namespace) -> dict[str, Any]:
    """Hammers ``target`` with a fresh ``limit``-TPM key; see the module docstring."""
    admitted: list[tuple[float, float, int]] = []  # (sent, done) since start, billed tokens
    statuses: collections.Counter[int] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    retry_after: list[str] = []
    refused_at: list[float] = []
    pause = args.tpm_pause_ms / 1000
    counter = 0
    t0 = time.perf_counter()
    end = t0 + args.tpm_seconds

    async def worker() -> None:
        nonlocal counter
        while time.perf_counter() < end:
            counter += 1
            body = chat_body(1_000_000 + counter, stream=False)
            sent = time.perf_counter() - t0
            try:
                async with target.session.post(
                    target.chat_url, data=body, headers=target.headers
                ) as reply:
                    raw = await reply.read()
                    statuses[reply.status] += 1
                    if reply.status == 200:
                        usage = orjson.loads(raw).get("usage") or {}
                        admitted.append(
                            (sent, time.perf_counter() - t0, int(usage.get("total_tokens", 0)))
                        )
                        continue
                    if reply.status == 429:
                        refused_at.append(sent)
                        if len(retry_after) < 1000:
                            retry_after.append(reply.headers.get("Retry-After", ""))
            except Exception as error:  # counted, not fatal
                errors[type(error).__name__] += 1
            await asyncio.sleep(pause)

    await asyncio.gather(*(worker() for _ in range(args.tpm_concurrency)))
    admitted.sort()
    first_window = sum(tokens for sent, _, tokens in admitted if sent < WINDOW_S)
    most = 0
    window = 0
    left = 0
    for sent, _, tokens in admitted:
        window += tokens
        while admitted[left][0] <= sent - WINDOW_S:
            window -= admitted[left][2]
            left += 1
        most = max(most, window)
    unbilled = sum(1 for _, _, tokens in admitted if tokens <= 0)
    buckets = [0] * (int(args.tpm_seconds // 5) + 1)
    for sent, _, tokens in admitted:
        buckets[min(int(sent // 5), len(buckets) - 1)] += tokens
    waits = sorted(float(v) for v in retry_after if v.replace(".", "", 1).isdigit())
    return {
        "limit": limit,
        "seconds": args.tpm_seconds,
        "concurrency": args.tpm_concurrency,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": dict(errors),
        "admitted_requests": len(admitted),
        "admitted_without_usage": unbilled,
        "tokens_first_window": first_window,
        "tokens_all": sum(t for _, _, t in admitted),
        "tokens_most_in_any_window": most,
        "used_ratio": round(first_window / limit, 4),
        "admitted_ratio": round(most / limit, 4),
        "first_refusal_s": round(min(refused_at), 3) if refused_at else None,
        "tokens_admitted_per_5s": buckets,
        "last_admitted_sent_s": round(admitted[-1][0], 3) if admitted else None,
        "retry_after_s": {
            "count": len(waits),
            "min": waits[0] if waits else None,
            "median": common.median(waits) if waits else None,
            "max": waits[-1] if waits else None,
            "missing": sum(1 for v in retry_after if not v),
        },
    }


async def no_key_status(target: Target) -> dict[str, Any]:
    """What a request without a key gets (status and the head of the body)."""
    try:
        async with target.session.post(
            target.chat_url,
            data=chat_body(0, stream=False),
            headers={"Content-Type": "application/json"},
        ) as reply:
            raw = await reply.read()
            return {"status": reply.status, "body": raw[:200].decode(errors="replace")}
    except Exception as error:
        return {"status": None, "body": f"{type(error).__name__}: {error}"}


async def wait_key_live(target: Target, timeout_s: float = 30.0) -> None:
    """Until the gateway's key view has the new key (it may lag by ms)."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with target.session.get(target.base_url + "/models", headers=target.headers) as r:
            await r.read()
            if r.status == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target.name}: GET /v1/models answers {r.status}")
        await asyncio.sleep(0.1)


# --- the run --------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    overridden = sorted(k for k in os.environ if k.startswith("MLMESH_GATEWAY_"))
    tmp = Path(tempfile.mkdtemp(prefix="mlmesh-bench-openai-", dir=args.tmpdir))
    fake_key = "sk-fake-" + secrets.token_hex(16)
    litellm_keys = {
        "plain": "sk-litellm-" + secrets.token_hex(16),
        "tpm": "sk-litellm-tpm-" + secrets.token_hex(16),
    }
    targets: dict[str, Target] = {}
    made: collections.Counter[str] = collections.Counter()  # requests per target
    results: dict[int, dict[str, dict[str, Any]]] = {}
    relay: dict[str, Any] = {}
    tpm: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    disturbance = gw.DisturbanceLog()
    uses_gateway = bool({"gateway", "envoy"} & set(args.target_list))
    relay_tokens = max(TOKENS, args.relay_tokens)
    try:
        async with contextlib.AsyncExitStack() as stack:
            fake_url, fake_pid = await start_fake(stack, tmp, fake_key, relay_tokens)
            pids = {"fake": fake_pid}
            connections = max([*args.levels, args.relay_streams, args.tpm_concurrency])
            targets["direct"] = Target("direct", fake_url, fake_key, connections)
            gateway_keys: dict[str, str] = {}
            mesh = workdir = None
            if uses_gateway:
                key_file = tmp / "fake.key"
                key_file.write_text(fake_key)
                key_file.chmod(0o600)
                os.environ["MLMESH_GATEWAY_OPENAI_UPSTREAMS"] = json.dumps(
                    {
                        MODEL: {
                            "endpoints": [f"local={fake_url}"],
                            "upstream_model": MODEL,
                            "api_key_file": str(key_file),
                            "tokenizer": "",
                        }
                    }
                )
                os.environ["MLMESH_GATEWAY_REDIS_URL"] = REDIS_URL
                os.environ["MLMESH_GATEWAY_HTTP_PORT_FILE"] = str(tmp / "gateway-http.port")
                flush_redis()
                mesh, ready, workdir = await stack.enter_async_context(
                    common.running_mesh(args, ("gateway",))
                )
                admin_key = mesh.admin_key()
                if not admin_key:
                    raise RuntimeError("the gateway wrote no admin key")
                child = mesh.children["gateway"]
                http_port = child.ports.get("http_port")
                if not http_port and (tmp / "gateway-http.port").exists():
                    http_port = int((tmp / "gateway-http.port").read_text())
                if not http_port:
                    raise RuntimeError(
                        f"the gateway serves no OpenAI surface (no http_port): {dict(child.ports)}"
                    )
                pids.update(common.mesh_pids(mesh))
                gateway_keys = {
                    "plain": await gateway_key(ready["address"], admin_key, "bench openai", gw.BIG),
                    "tpm": await gateway_key(
                        ready["address"], admin_key, "bench openai tpm", args.tpm
                    ),
                }
                urls = {
                    "gateway": f"http://127.0.0.1:{http_port}/v1",
                    "envoy": f"http://{ready['address']}/v1",
                }
                for name in ("gateway", "envoy"):
                    if name in args.target_list:
                        targets[name] = Target(name, urls[name], gateway_keys["plain"], connections)
                        await wait_key_live(targets[name])
                if (redis := gw.redis_pid()) is not None:
                    pids["redis"] = redis
            if "litellm" in args.target_list:
                litellm_url, litellm_pid = await start_litellm(
                    stack, tmp, args.litellm_dir, fake_url, fake_key, litellm_keys, args.tpm
                )
                pids.update(litellm_pids(litellm_pid))
                targets["litellm"] = Target(
                    "litellm", litellm_url, litellm_keys["plain"], connections
                )
            for target in targets.values():
                stack.push_async_callback(target.close)
            names = [t for t in TARGET_NAMES if t in targets]
            meter = tb.MachineCpuMeter(pids)
            print(
                f"fake {fake_url}; targets "
                + ", ".join(f"{n} {targets[n].base_url}" for n in names)
                + f"; levels {args.levels}, {args.rounds} rounds, scenarios "
                + ",".join(args.scenario_list),
                flush=True,
            )
            checks["no_key"] = {n: await no_key_status(targets[n]) for n in names}

            # 1. Latency and CPU per request.
            index = 0
            for level in args.levels:
                total = max(args.requests, args.per_task * level)
                results[level] = {}
                for scenario in args.scenario_list:
                    stream = scenario == "stream"
                    for name in names:  # warm-up
                        warm = Burst()
                        await warm.run(targets[name], stream, max(args.warmup, level), level, index)
                        index += max(args.warmup, level)
                        made[name] += max(args.warmup, level)
                        if warm.errors or warm.wrong:
                            print(
                                f"  warm-up {scenario}/{name} c={level}: errors "
                                f"{dict(warm.errors)} wrong {dict(warm.wrong)} {warm.first_error}",
                                flush=True,
                            )
                    bursts = {n: Burst() for n in names}
                    cpu: dict[str, dict[str, float]] = {n: {} for n in names}
                    for r in range(args.rounds):
                        count = total // args.rounds + (1 if r < total % args.rounds else 0)
                        for name in rotate(names, r):
                            work = bursts[name].run(targets[name], stream, count, level, index)
                            await measured(meter, disturbance, cpu[name], work)
                            index += count
                            made[name] += count
                    results[level][scenario] = {n: summarize(bursts[n], cpu[n]) for n in names}
                    line = " | ".join(
                        f"{n} p50 {results[level][scenario][n]['p50_ms']:.2f} ms "
                        f"{results[level][scenario][n]['rps']:.0f}/s"
                        for n in names
                    )
                    print(f"  c={level:<3d} {scenario:<9s} {line}", flush=True)

            # 2. TPM accuracy.
            if args.tpm_seconds > 0:
                probes = []
                if "gateway" in targets:
                    probes.append(("gateway", targets["gateway"].base_url, gateway_keys["tpm"]))
                if "litellm" in targets:
                    probes.append(("litellm", targets["litellm"].base_url, litellm_keys["tpm"]))
                for name, url, key in probes:
                    probe_target = Target(name, url, key, args.tpm_concurrency)
                    try:
                        if name == "gateway":
                            await wait_key_live(probe_target)
                        cpu_probe: dict[str, float] = {}
                        outcome = await measured(
                            meter, disturbance, cpu_probe, tpm_probe(probe_target, args.tpm, args)
                        )
                        outcome["cpu_seconds"] = cpu_probe
                        tpm[name] = outcome
                    finally:
                        await probe_target.close()
                    print(
                        f"  tpm {name}: admitted {tpm[name]['admitted_ratio']:.3f}x, used "
                        f"{tpm[name]['used_ratio']:.3f}x of {args.tpm} "
                        f"(statuses {tpm[name]['statuses']})",
                        flush=True,
                    )

            # 3. Relay: chunks/s.
            if args.relay_rounds > 0:
                bursts = {n: Burst() for n in names}
                cpu = {n: {} for n in names}
                for r in range(args.relay_rounds):
                    for name in rotate(names, r):
                        work = bursts[name].run(
                            targets[name],
                            True,
                            args.relay_streams,
                            args.relay_streams,
                            index,
                            max_tokens=args.relay_tokens,
                        )
                        await measured(meter, disturbance, cpu[name], work)
                        index += args.relay_streams
                        made[name] += args.relay_streams
                relay = {n: summarize(bursts[n], cpu[n]) for n in names}
                print(
                    "  relay "
                    + " | ".join(f"{n} {relay[n]['chunks_per_s']:.0f} chunks/s" for n in names),
                    flush=True,
                )

            disturbance.check()
            await asyncio.sleep(0.5)  # the last ledger writes
            async with targets["direct"].session.get(
                fake_url.removesuffix("/v1") + "/_requests"
            ) as reply:
                checks["fake_requests_per_path"] = (await reply.json())["counts"]
            # Every request the bench made that a target let through reaches the
            # fake exactly once (no hidden retries; a refusal never does), plus
            # the keyless request sent straight to the fake.
            admitted = sum(p["admitted_requests"] for p in tpm.values())
            checks["requests_made"] = {
                "latency_and_relay_per_target": dict(made),
                "tpm_probe_statuses": {n: p["statuses"] for n, p in tpm.items()},
                "fake_should_have_seen": sum(made.values()) + admitted + 1,
            }
            if uses_gateway:
                gateway_ok = made["gateway"] + made["envoy"]
                gateway_ok += tpm.get("gateway", {}).get("admitted_requests", 0)
                checks["requests_made"]["ledger_should_have"] = {"generate/OK": gateway_ok}
            if uses_gateway and workdir is not None:
                checks.update(gw.checks_after(workdir / "state", redis=False))
                checks["redis_throttle_keys"] = redis_keys()
            checks["disturbance"] = disturbance.report(
                [s for by in results.values() for t in by.values() for s in t.values()]
                + list(relay.values())
            )
            checks["litellm_log_tail"] = (
                _tail(tmp / "litellm.log", 5) if "litellm" in targets else ""
            )
    finally:
        if uses_gateway:
            try:
                flush_redis()
            except Exception as error:  # cleanup only
                print(f"warning: could not flush {REDIS_URL}: {error}", file=sys.stderr)
        if args.keep_state:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    derived = report(args, results, tpm, relay, checks)
    payload = {
        "benchmark": NAME,
        "params": {
            "targets": args.target_list,
            "levels": args.levels,
            "scenarios": args.scenario_list,
            "requests": args.requests,
            "per_task": args.per_task,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "tokens": TOKENS,
            "tpm": args.tpm,
            "tpm_seconds": args.tpm_seconds,
            "tpm_concurrency": args.tpm_concurrency,
            "tpm_pause_ms": args.tpm_pause_ms,
            "relay_streams": args.relay_streams,
            "relay_tokens": args.relay_tokens,
            "relay_rounds": args.relay_rounds,
            "redis_url": REDIS_URL if uses_gateway else None,
            "client_loop": "asyncio" if args.no_uvloop else "uvloop",
            "env_overridden_by_caller": overridden,
        },
        "environment": {**common.environment(args), "litellm": litellm_version(args.litellm_dir)},
        "results": {str(k): v for k, v in results.items()},
        "tpm_probe": tpm,
        "relay": relay,
        "derived": derived,
        "aims": {
            "added_p50_ms_at_c1_at_most": AIM_ADDED_P50_MS,
            "gateway_cpu_us_per_request_at_most": AIM_GATEWAY_CPU_US,
            "times_less_than_litellm_at_least": AIM_TIMES_LESS_THAN_LITELLM,
            "admitted_ratio_at_most": AIM_ADMITTED,
            "used_ratio_at_least": AIM_USED,
        },
        "checks": checks,
    }
    print(f"\nresults: {common.write_json(NAME, args, payload)}")
    return 0


def litellm_version(litellm_dir: Path) -> str:
    python = litellm_dir / ".venv" / "bin" / "python"
    try:
        return subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def report(
    args: argparse.Namespace,
    results: dict[int, dict[str, dict[str, Any]]],
    tpm: dict[str, Any],
    relay: dict[str, Any],
    checks: dict[str, Any],
) -> dict[str, Any]:
    """Prints the tables; returns the derived numbers for the JSON."""
    rows = []
    derived: dict[str, Any] = {"latency": {}, "relay": {}, "tpm": {}}
    for level, by_scenario in results.items():
        for scenario, by_target in by_scenario.items():
            direct = by_target["direct"]
            for name, s in by_target.items():
                per = s["cpu_us_per_request"]
                rows.append(
                    [
                        f"c={level}",
                        scenario,
                        name,
                        s["ok"],
                        sum(s["errors"].values()) + sum(s["wrong"].values()),
                        s["p50_ms"],
                        s["p99_ms"],
                        s["rps"],
                        per.get("client"),
                        per.get("fake"),
                        proxy_cpu(name, per) if name != "direct" else float("nan"),
                        s["other_cores"],
                    ]
                )
                if name == "direct":
                    continue
                derived["latency"][f"c={level}/{scenario}/{name}"] = {
                    "level": level,
                    "scenario": scenario,
                    "target": name,
                    "added_p50_ms": s["p50_ms"] - direct["p50_ms"],
                    "added_p99_ms": s["p99_ms"] - direct["p99_ms"],
                    "rps_ratio_vs_direct": s["rps"] / direct["rps"] if direct["rps"] else None,
                    "proxy_cpu_us_per_request": proxy_cpu(name, per),
                    "proxy_cpu_us_per_chunk": proxy_cpu(name, s["cpu_us_per_chunk"])
                    if scenario == "stream"
                    else None,
                }
    print()
    print(
        "Latency (nonstream: whole answer; stream: time to first token), ms; req/s; "
        "CPU us per request; proxy = the gateway process (+ Envoy for envoy) or LiteLLM"
    )
    print(
        common.table(
            [
                "level",
                "scenario",
                "target",
                "ok",
                "err",
                "p50",
                "p99",
                "req/s",
                "cpu client",
                "cpu fake",
                "cpu proxy",
                "other cores",
            ],
            rows,
        )
    )
    print()
    print(
        common.table(
            [
                "level",
                "scenario",
                "target",
                "added p50",
                "added p99",
                "req/s vs direct",
                "proxy us/req",
            ],
            [
                [
                    f"c={v['level']}",
                    v["scenario"],
                    v["target"],
                    v["added_p50_ms"],
                    v["added_p99_ms"],
                    v["rps_ratio_vs_direct"],
                    v["proxy_cpu_us_per_request"],
                ]
                for v in derived["latency"].values()
            ],
        )
    )
    if tpm:
        print()
        print(f"TPM probe: limit {args.tpm} tokens/min, {args.tpm_seconds:.0f} s")
        print(
            common.table(
                [
                    "target",
                    "200",
                    "429",
                    "other",
                    "admitted x",
                    "used x",
                    "first 429 s",
                    "Retry-After s",
                ],
                [
                    [
                        name,
                        p["statuses"].get("200", 0),
                        p["statuses"].get("429", 0),
                        sum(v for k, v in p["statuses"].items() if k not in ("200", "429"))
                        + sum(p["errors"].values()),
                        p["admitted_ratio"],
                        p["used_ratio"],
                        p["first_refusal_s"],
                        p["retry_after_s"]["median"],
                    ]
                    for name, p in tpm.items()
                ],
            )
        )
        derived["tpm"] = {
            name: {"admitted_ratio": p["admitted_ratio"], "used_ratio": p["used_ratio"]}
            for name, p in tpm.items()
        }
    if relay:
        print()
        print(
            f"Relay: {args.relay_streams} streams x {args.relay_tokens} tokens, "
            f"{args.relay_rounds} rounds"
        )
        print(
            common.table(
                ["target", "streams ok", "err", "chunks/s", "proxy us/chunk", "client us/chunk"],
                [
                    [
                        name,
                        s["ok"],
                        sum(s["errors"].values()) + sum(s["wrong"].values()),
                        s["chunks_per_s"],
                        proxy_cpu(name, s["cpu_us_per_chunk"]) if name != "direct" else "-",
                        s["cpu_us_per_chunk"].get("client"),
                    ]
                    for name, s in relay.items()
                ],
            )
        )
        derived["relay"] = {
            name: {
                "chunks_per_s": s["chunks_per_s"],
                "proxy_cpu_us_per_chunk": proxy_cpu(name, s["cpu_us_per_chunk"]),
            }
            for name, s in relay.items()
        }
    derived["aims"] = aims(results, tpm)
    print()
    for line in derived["aims"]["lines"]:
        print(line)
    print(f"\nno key: {checks.get('no_key')}")
    if not checks.get("disturbance", {}).get("clean", True):
        print(f"WARNING: the machine was not quiet: {checks['disturbance']}")
    return derived


def aims(results: dict[int, dict[str, dict[str, Any]]], tpm: dict[str, Any]) -> dict[str, Any]:
    """The issue's aims, where this run measured what they need."""
    out: dict[str, Any] = {"lines": []}
    level = min(results) if results else None
    if level != 1 or "nonstream" not in results.get(1, {}):
        return out
    by = results[1]["nonstream"]
    direct = by["direct"]
    for name in ("gateway", "litellm"):
        if name in by:
            out[f"{name}_added_p50_ms_c1"] = by[name]["p50_ms"] - direct["p50_ms"]
            out[f"{name}_cpu_us_per_request_c1"] = proxy_cpu(name, by[name]["cpu_us_per_request"])
    if "gateway" in by:
        added = out["gateway_added_p50_ms_c1"]
        cpu = out["gateway_cpu_us_per_request_c1"]
        out["lines"].append(
            f"gateway adds {added:.3f} ms p50 at c=1 (aim <= {AIM_ADDED_P50_MS}): "
            f"{'met' if added <= AIM_ADDED_P50_MS else 'NOT met'}; "
            f"gateway CPU {cpu:.0f} us/request (aim <= {AIM_GATEWAY_CPU_US:.0f}): "
            f"{'met' if cpu <= AIM_GATEWAY_CPU_US else 'NOT met'}"
        )
        if "litellm" in by:
            lat = out["litellm_added_p50_ms_c1"] / added if added > 0 else float("inf")
            cpu_x = out["litellm_cpu_us_per_request_c1"] / cpu if cpu > 0 else float("inf")
            out["litellm_over_gateway_added_p50"] = lat
            out["litellm_over_gateway_cpu"] = cpu_x
            out["lines"].append(
                f"LiteLLM/gateway: added p50 {lat:.1f}x, CPU per request {cpu_x:.1f}x "
                f"(aim >= {AIM_TIMES_LESS_THAN_LITELLM:.0f}x on both)"
            )
    elif "litellm" in by:
        out["lines"].append(
            f"LiteLLM adds {out['litellm_added_p50_ms_c1']:.3f} ms p50 at c=1, "
            f"{out['litellm_cpu_us_per_request_c1']:.0f} us CPU per request"
        )
    for name, p in tpm.items():
        out["lines"].append(
            f"TPM {name}: admitted {p['admitted_ratio']:.3f}x (aim <= {AIM_ADMITTED}), used "
            f"{p['used_ratio']:.3f}x (aim >= {AIM_USED})"
        )
    return out


if __name__ == "__main__":
    arguments = parse()
    if not arguments.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
    sys.exit(common.run(main, arguments))

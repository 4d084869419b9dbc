"""Shared plumbing for the Triton benchmarks (not a benchmark itself).

Closed-loop bursts over an async call, the Triton python backend stub
processes (one per loaded model instance, children of tritonserver, whose CPU
is not in tritonserver's own /proc/<pid>/stat), waiting for a model to be
ready, and Triton's per-model execution statistics (to get the average batch
size the dynamic batcher formed).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import _common as common
from mlmesh_inference.triton import TritonClient

CALL_TIMEOUT = 30.0


class Burst:
    """`total` calls of ``call(i)`` spread over `concurrency` closed-loop tasks.

    ``call`` returns None when the answer was right, or a short string naming
    what was wrong with it; an exception counts as an error by its class name.
    Latencies are in ns; ``seconds`` adds up the bursts' wall time.
    """

    def __init__(self) -> None:
        self.latencies: list[int] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.wrong: collections.Counter[str] = collections.Counter()
        self.seconds = 0.0
        self.first_error = ""

    async def run(
        self,
        call: Callable[[int], Awaitable[str | None]],
        total: int,
        concurrency: int,
        start: int = 0,
    ) -> None:
        next_index = start
        end = start + total

        async def worker() -> None:
            nonlocal next_index
            while next_index < end:
                i = next_index
                next_index += 1
                started = time.perf_counter_ns()
                try:
                    problem = await call(i)
                except Exception as error:  # counted, not fatal
                    self.errors[type(error).__name__] += 1
                    self.first_error = self.first_error or f"{type(error).__name__}: {error}"
                    continue
                self.latencies.append(time.perf_counter_ns() - started)
                if problem:
                    self.wrong[problem] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
        self.seconds += time.perf_counter() - started


def summarize(burst: Burst, cpu: dict[str, float], items_per_call: int = 1) -> dict[str, Any]:
    ms = sorted(v / 1e6 for v in burst.latencies)
    done = len(ms)
    return {
        "ok": done,
        "errors": dict(burst.errors),
        "first_error": burst.first_error,
        "wrong": dict(burst.wrong),
        "seconds": round(burst.seconds, 3),
        "rps": done / burst.seconds if burst.seconds else float("nan"),
        "items_per_s": done * items_per_call / burst.seconds if burst.seconds else float("nan"),
        "p50_ms": common.percentile(ms, 50),
        "p90_ms": common.percentile(ms, 90),
        "p99_ms": common.percentile(ms, 99),
        "mean_ms": sum(ms) / done if done else float("nan"),
        "max_ms": ms[-1] if ms else float("nan"),
        "cpu_seconds": cpu,
        "cpu_us_per_request": {
            k: round(v / done * 1e6, 1) if done else None for k, v in cpu.items()
        },
    }


def add_cpu(total: dict[str, float], delta: dict[str, float]) -> None:
    for key, value in delta.items():
        total[key] = round(total.get(key, 0.0) + value, 3)


def stub_pids(triton_pid: int, repository: Path) -> dict[str, int]:
    """{"stub:<model>": pid} for tritonserver's python backend stub children."""
    out: dict[str, int] = {}
    marker = str(repository).rstrip("/") + "/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) != triton_pid:  # ppid
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for arg in argv:
            text = arg.decode(errors="replace")
            if text.startswith(marker):
                model = text[len(marker) :].split("/", 1)[0]
                out[f"stub:{model}"] = int(entry.name)
                break
        else:
            out[f"child:{entry.name}"] = int(entry.name)
    return out


class MachineCpuMeter(common.CpuMeter):
    """Adds "other": CPU seconds the whole machine was busy (/proc/stat) less
    what the metered processes used, i.e. what anything else on the machine
    took meanwhile (a disturbance gauge; 10 ms resolution)."""

    def sample(self) -> dict[str, float]:
        values = super().sample()
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        # user nice system idle iowait irq softirq steal
        busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7) if i < len(fields))
        values["other"] = busy / self.tick - sum(v for v in values.values() if v == v)
        return values


def meter_for(mesh: Any, repository: Path, models: tuple[str, ...]) -> common.CpuMeter:
    """CPU of this process, Envoy, the services, the named models' stubs, other."""
    pids = common.mesh_pids(mesh)
    triton_pid = pids.get("triton")
    stubs = stub_pids(triton_pid, repository) if triton_pid else {}
    for model in models:
        key = f"stub:{model}"
        if key in stubs:
            pids[key] = stubs[key]
    return MachineCpuMeter(pids)


async def wait_ready(client: TritonClient, model: str, timeout_s: float = 180.0) -> float:
    """Polls until Triton says ``model`` is ready; returns the seconds it took."""
    started = time.monotonic()
    while not await client.model_ready(model):
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{model} not ready on Triton after {timeout_s:.0f}s")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def model_counts(raw: Any, model: str) -> dict[str, int]:
    """Triton's cumulative inference and execution counts for ``model``."""
    stats = await raw.get_inference_statistics(model, as_json=True, client_timeout=CALL_TIMEOUT)
    inference = execution = 0
    for entry in stats.get("model_stats", []):
        inference += int(entry.get("inference_count", 0))
        execution += int(entry.get("execution_count", 0))
    return {"inference_count": inference, "execution_count": execution}


def batch_size(before: dict[str, int], after: dict[str, int]) -> float:
    executions = after["execution_count"] - before["execution_count"]
    inferences = after["inference_count"] - before["inference_count"]
    return inferences / executions if executions else float("nan")


def torch_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("MLMESH_TRITON_", "OMP_", "MKL_"))}

"""What one request's throttle calls cost the gateway: admit + settle in
Redis through the throttle's lean pipelined client (``mlmesh_metering.resp``),
against the same two scripts through redis-py's asyncio pool (what the
throttle used before), in one process, alternating.

    .venv/bin/python bench/throttle_redis.py [--url redis://127.0.0.1:6379/14] \\
        [--pairs 2000] [--rounds 6]

Three ways, each ``--pairs`` admit+settle pairs per round, sequential (one
request at a time, as at concurrency 1):

* ``redis-py``: ``redis.asyncio`` scripts (EVALSHA) on a BlockingConnectionPool;
* ``lean``: ``RedisThrottle.admit`` and an awaited ``RedisThrottle.settle``;
* ``lean, settle posted``: the settle written and its reply checked later
  (``RedisThrottle.post_settle``, what a request's end does).

Figures: CPU (this process) and wall time per pair, median over rounds. The
database given is flushed before and after. Writes
bench/results/throttle_redis.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mlmesh_metering import throttle
from mlmesh_metering.throttle import Limits, RedisThrottle

RESULTS = Path(__file__).parent / "results" / "throttle_redis.json"


async def main(args: argparse.Namespace) -> dict:
    import redis.asyncio as redis

    shared = RedisThrottle(args.url, timeout_s=1.0)
    # redis-py as the throttle held it before: a blocking pool, short timeouts.
    pool = redis.BlockingConnectionPool.from_url(
        args.url, max_connections=256, timeout=1.0, socket_timeout=1.0, socket_connect_timeout=1.0
    )
    plain = redis.Redis(connection_pool=pool)
    await plain.flushdb()
    admit_script = plain.register_script(throttle._ADMIT)
    settle_script = plain.register_script(throttle._SETTLE)
    limits = Limits(tokens_per_minute=10**12)
    tz, th, rz, sz, tt = shared._keys("bench")

    async def redis_py(call_id: str) -> None:
        now = int(time.time() * 1000)
        await admit_script(
            keys=[tz, th, rz, sz, tt],
            args=[now, 60_000, call_id, 100, limits.tokens_per_minute, 0, 0, 600_000],
        )
        await settle_script(keys=[th, sz, tt], args=[call_id, 50])

    async def lean(call_id: str) -> None:
        await shared.admit("bench", call_id, 100, limits)
        await shared.settle("bench", call_id, 50)

    async def lean_posted(call_id: str) -> None:
        await shared.admit("bench", call_id, 100, limits)
        if not shared.post_settle("bench", call_id, 50):
            await shared.settle("bench", call_id, 50)

    ways: dict[str, Callable[[str], Awaitable[None]]] = {
        "redis-py": redis_py,
        "lean": lean,
        "lean, settle posted": lean_posted,
    }
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for name, way in ways.items():  # warm-up (connections, script loads)
        for i in range(100):
            await way(f"warm-{name}-{i}")
    for round_ in range(args.rounds):
        for name, way in ways.items():
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(args.pairs):
                await way(f"{name}-{round_}-{i}")
            measured[name].append(
                (
                    (time.process_time() - cpu) / args.pairs * 1e6,
                    (time.perf_counter() - wall) / args.pairs * 1e6,
                )
            )
    await plain.flushdb()
    await shared.close()
    await plain.aclose()
    await pool.disconnect()
    return {
        name: {
            "cpu_us_per_pair_median": statistics.median(c for c, _ in rows),
            "wall_us_per_pair_median": statistics.median(w for _, w in rows),
            "rounds": [{"cpu_us": c, "wall_us": w} for c, w in rows],
        }
        for name, rows in measured.items()
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--output", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    results = asyncio.run(main(arguments))
    print(f"{'way':<22} {'cpu us/pair':>12} {'wall us/pair':>13}")
    for name, row in results.items():
        print(
            f"{name:<22} {row['cpu_us_per_pair_median']:>12.1f} "
            f"{row['wall_us_per_pair_median']:>13.1f}"
        )
    arguments.output.write_text(
        json.dumps(
            {
                "benchmark": "throttle_redis",
                "params": vars(arguments) | {"output": str(arguments.output)},
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {arguments.output}")

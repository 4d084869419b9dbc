"""What checking a caller costs each service, in process: the chassis'
CallerCheck (full-match parse of the bearer, SHA-256, view lookup, state,
expiry, grace and scope checks) per call, against a view of N keys.

    .venv/bin/python bench/auth_check.py [--keys 10000] [--calls 200000]

No server and no network: this is the whole cost the key check adds to an
RPC (Envoy no longer calls the gateway for it). Prints microseconds per
check (median of 5 runs) for an ADMIN key, a scoped key on a read-only
method, and a refused unknown key. Writes bench/results/auth_check.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from pathlib import Path

from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.auth import CallerCheck, KeyView
from mlmesh_chassis.errors import MlmeshError
from mlmesh_chassis.testing import directory_key

METHOD = "/mlmesh.registry.v1.RegistryService/ResolveModelReference"


class Context:
    """What CallerCheck reads of a grpc.aio call context."""

    def __init__(self, secret: str) -> None:
        self.metadata = (("authorization", f"Bearer {secret}"), ("x-request-id", "r"))

    def invocation_metadata(self):  # type: ignore[no-untyped-def]
        return self.metadata


async def per_call_us(check: CallerCheck, context: Context, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        with contextlib.suppress(MlmeshError):
            await check.check(METHOD, context)  # type: ignore[arg-type]
    return (time.perf_counter() - started) / calls * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "auth_check.json"
    )
    args = parser.parse_args()
    entries = []
    for i in range(args.keys):
        entry, _ = directory_key([pb.PLATFORM_SERVICE_GENERATE], revision=i + 1)
        entries.append(entry)
    admin, admin_secret = directory_key([pb.PLATFORM_SERVICE_ADMIN])
    reader, reader_secret = directory_key([pb.PLATFORM_SERVICE_REGISTRY_READ])
    view = KeyView()
    view.replace([*entries, admin, reader], args.keys + 1)
    check = CallerCheck(view)
    cases = {
        "admin key": Context(admin_secret),
        "REGISTRY_READ key, read-only method": Context(reader_secret),
        "unknown key (refused)": Context(f"mlm_{'f' * 16}_" + "A" * 32),
    }
    results = {}
    for name, context in cases.items():
        runs = [await per_call_us(check, context, args.calls // 5) for _ in range(5)]
        results[name] = round(statistics.median(runs), 2)
        print(f"{name:40s} {results[name]:8.2f} us per check", flush=True)
    args.output.write_text(
        json.dumps(
            {"benchmark": "auth_check", "keys": args.keys, "us_per_check": results}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    asyncio.run(main())

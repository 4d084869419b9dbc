"""Streaming freshness: from an event appended to its window's aggregate
served, through the real path (IngestEvents -> event log -> Flink on a
standalone cluster -> committed part files -> the loader -> the online
store -> GetOnlineFeatures), all calls through Envoy with keys on.

    .venv/bin/python bench/features_freshness.py [--windows 60] [--rate 20] [--store sqlite]

A mesh of the feature service (its loader on) and the gateway (the key
directory) starts in a temp dir; a bench definition is applied: a stream
source and a view with a 1 s step (a tumbling count and sum over 1 s). The
streaming supervisor's ``Streaming`` starts the Flink cluster and submits
the job for the definitions in force. Then one sender appends an event
every 1/--rate s at wall-clock time (one IngestEvents call each, one user),
and one reader polls GetOnlineFeatures every 5 ms.

Freshness of the window ending at t: from the return of the IngestEvents
call carrying the first event that closes it (its event time e with
e - watermark_delay >= t - 1 ms, so the watermark passes the window's last
millisecond), to the first GetOnlineFeatures answer whose value's event
time (the window end) is t or later. The served count of each window whose
own end was read is checked against the events sent into it. Figures:
p50/p90/p99/max over --windows windows (after --warmup windows).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from typing import Any

import _common as common
from google.protobuf import struct_pb2, timestamp_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc
from mlmesh.gateway.v1 import gateway_pb2

SOURCE, VIEW, USER = "bench_clicks", "bench_fresh", 1
STEP_MS = 1000
CALL_TIMEOUT = 30.0
DEFINITIONS = textwrap.dedent(
    f"""\
    entities:
      - {{name: bench_user, join_key: user_id, value_type: int64}}
    sources:
      - name: {SOURCE}
        kind: stream
        timestamp_field: event_time
        columns: {{user_id: int64, value: double}}
    feature_views:
      - name: {VIEW}
        entities: [bench_user]
        source: {SOURCE}
        step: 1s
        aggregations:
          - {{name: clicks_1s, function: count, window: 1s}}
          - {{name: value_1s, function: sum, column: value, window: 1s}}
    """
)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=60, help="windows measured")
    parser.add_argument("--warmup", type=int, default=5, help="windows served before measuring")
    parser.add_argument("--rate", type=float, default=20.0, help="events (calls) per second")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="reader's interval")
    parser.add_argument("--store", default="sqlite", help="sqlite or a redis:// URL")
    common.add_common_args(parser)
    return parser.parse_args()


def _event(when: datetime) -> pb.Event:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return pb.Event(
        values={
            "user_id": struct_pb2.Value(number_value=USER),
            "value": struct_pb2.Value(number_value=1.0),
        },
        event_time=stamp,
    )


class Windows:
    """What the sender sent and closed, and what the reader saw served."""

    def __init__(self, delay_ms: int) -> None:
        self.delay_ms = delay_ms
        self.sent: dict[int, int] = {}  # window end -> events sent into it
        self.closed_at: dict[int, float] = {}  # window end -> closing call's return
        self.served_at: dict[int, float] = {}  # window end -> first answer at or past it
        self.counts: dict[int, int] = {}  # window end -> count served at its own end
        self.first_end: int | None = None  # first window whose events were all sent here
        self.last_served = 0

    def sent_event(self, event_ms: int, returned: float) -> None:
        end = (event_ms // STEP_MS + 1) * STEP_MS
        if self.first_end is None:
            self.first_end = end + STEP_MS  # the first window may have begun before us
        self.sent[end] = self.sent.get(end, 0) + 1
        # Every end t with t - 1 <= event - delay is now closed.
        closes_up_to = ((event_ms - self.delay_ms + 1) // STEP_MS) * STEP_MS
        for t in range(closes_up_to, closes_up_to - 10 * STEP_MS, -STEP_MS):
            if t in self.closed_at:
                break
            self.closed_at[t] = returned

    def served(self, end: int, count: int, seen: float) -> None:
        if end <= self.last_served:
            return
        # Every end up to this one is served now (the loader writes only an
        # entity's newest end; an end in between was superseded).
        lower = self.last_served or end - STEP_MS
        for t in range(end, lower, -STEP_MS):
            self.served_at.setdefault(t, seen)
        self.counts[end] = count
        self.last_served = end


async def measure(args: argparse.Namespace, stub: Any, windows: Windows) -> dict[str, Any]:
    stop = asyncio.Event()
    errors: list[str] = []

    async def sender() -> None:
        interval = 1.0 / args.rate
        next_at = time.monotonic()
        while not stop.is_set():
            now = datetime.now(UTC)
            event_ms = int(now.timestamp() * 1000)
            await stub.IngestEvents(
                rpc.IngestEventsRequest(source=SOURCE, events=[_event(now)]), timeout=CALL_TIMEOUT
            )
            windows.sent_event(event_ms, time.monotonic())
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def reader() -> None:
        request = rpc.GetOnlineFeaturesRequest(
            features=rpc.FeatureReferences(references=[f"{VIEW}:clicks_1s"]),
            entity_rows=[pb.EntityRow(join_keys={"user_id": struct_pb2.Value(number_value=USER)})],
        )
        while not stop.is_set():
            answer = await stub.GetOnlineFeatures(request, timeout=CALL_TIMEOUT)
            value = answer.rows[0].values[0]
            if value.status == pb.FEATURE_STATUS_PRESENT:
                end = value.event_time.seconds * 1000 + value.event_time.nanos // 1_000_000
                windows.served(end, int(value.value.number_value), time.monotonic())
            await asyncio.sleep(args.poll_ms / 1000)

    tasks = [asyncio.create_task(sender()), asyncio.create_task(reader())]
    started = time.monotonic()
    try:
        while True:
            await asyncio.sleep(0.5)
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            measured = _measured(args, windows)
            if len(measured) >= args.windows:
                break
            if time.monotonic() - started > 30 and not windows.served_at:
                errors.append("no window served in 30 s")
                break
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    measured = _measured(args, windows)[: args.windows]
    latencies = sorted(ms for _, ms in measured)
    exact = [
        (t, windows.counts[t], windows.sent.get(t, 0)) for t, _ in measured if t in windows.counts
    ]
    wrong = [(t, got, sent) for t, got, sent in exact if got != sent]
    return {
        "windows": len(latencies),
        "p50_ms": common.percentile(latencies, 50),
        "p90_ms": common.percentile(latencies, 90),
        "p99_ms": common.percentile(latencies, 99),
        "max_ms": latencies[-1] if latencies else float("nan"),
        "min_ms": latencies[0] if latencies else float("nan"),
        "counts_checked": len(exact),
        "counts_wrong": wrong[:10],
        "errors": errors,
    }


def _measured(args: argparse.Namespace, windows: Windows) -> list[tuple[int, float]]:
    """(window end, freshness ms) of served, closed windows after the warmup."""
    if windows.first_end is None:
        return []
    ends = sorted(
        t
        for t in windows.served_at
        if t in windows.closed_at and t >= windows.first_end + args.warmup * STEP_MS
    )
    return [(t, (windows.served_at[t] - windows.closed_at[t]) * 1000) for t in ends]


async def main(args: argparse.Namespace) -> int:
    from mlmesh_features.streaming import flinkenv, jobspec
    from mlmesh_features.streaming.supervisor import Streaming

    results: dict[str, Any] = {"environment": common.environment(args), "args": vars(args)}
    if args.store != "sqlite":
        import os

        os.environ["MLMESH_FEATURES_ONLINE_STORE"] = args.store
    async with common.running_mesh(args, ("features", "gateway")) as (mesh, ready, workdir):
        target = ready["address"]
        secret = await common.app_key(
            target, mesh.admin_key(), gateway_pb2.PLATFORM_SERVICE_FEATURES
        )
        async with common.channel(target, api_key=secret) as channel:
            stub = features_service_pb2_grpc.FeatureServiceStub(channel)
            await stub.ApplyFeatureDefinitions(
                rpc.ApplyFeatureDefinitionsRequest(source=DEFINITIONS, source_name="bench.yaml"),
                timeout=120.0,
            )
            streaming = Streaming(
                workdir / "state" / "features",
                workdir / "flink",
                flinkenv.DEFAULT_ENV,
                demo=False,
            )
            started = time.monotonic()
            try:
                await asyncio.to_thread(streaming.start)
                results["flink_start_s"] = round(time.monotonic() - started, 1)
                print(f"flink cluster and job up in {results['flink_start_s']} s", flush=True)
                windows = Windows(jobspec.WATERMARK_DELAY_MS)
                results["freshness"] = await measure(args, stub, windows)
            finally:
                await asyncio.to_thread(streaming.stop)
    fresh = results["freshness"]
    print()
    print(
        common.table(
            ["path", "windows", "p50 ms", "p90 ms", "p99 ms", "max ms", "counts ok"],
            [
                [
                    "IngestEvents -> served",
                    fresh["windows"],
                    fresh["p50_ms"],
                    fresh["p90_ms"],
                    fresh["p99_ms"],
                    fresh["max_ms"],
                    f"{fresh['counts_checked'] - len(fresh['counts_wrong'])}"
                    f"/{fresh['counts_checked']}",
                ]
            ],
        )
    )
    if fresh["errors"] or fresh["counts_wrong"]:
        print(f"problems: {fresh['errors']} {fresh['counts_wrong']}", file=sys.stderr)
    path = common.write_json("features_freshness", args, results)
    print(f"\nresults: {path}")
    return 0 if not fresh["errors"] and not fresh["counts_wrong"] else 1


if __name__ == "__main__":
    arguments = parse()
    tempfile.tempdir = str(arguments.tmpdir) if arguments.tmpdir else None
    sys.exit(common.run(main, arguments))

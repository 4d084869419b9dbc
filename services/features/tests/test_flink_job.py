"""The streaming job on a real standalone Flink cluster (a jobmanager and a
taskmanager, from the Flink environment .envs/flink), held to the batch path.

Every test feeds one generated event stream (several users, out-of-order
events within the watermark delay, late events beyond it) to the event log as
the features service writes it (JSON-lines files, renamed into place, several
of them, appended while the job runs), then checks the job's committed output
against ``batch.compute_view`` over the log's events minus the job's late
output: every value for every entity at every window end, exactly (means to
1e-9 relative). Amounts are multiples of 1/4, so a sum is exact in any order
(Flink adds in arrival order, pandas with Kahan summation).

One cluster serves the module. scripts/setup.sh provisions its environment:
missing, the tests fail under CI and skip elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlmesh_features import batch, definitions
from mlmesh_features.streaming import eventlog, flinkenv, job, jobspec
from mlmesh_features.streaming.cluster import FlinkCluster, FlinkError

ENV = flinkenv.DEFAULT_ENV
DELAY_MS = 2000
# A round number of days since the epoch, so every window grid lines up.
T0 = 20_000 * 86_400_000
OUTPUT_TIMEOUT_S = 60.0

DEFINITIONS = """\
entities:
  - {name: user, join_key: user_id, value_type: int64}
sources:
  - name: clicks
    kind: stream
    timestamp_field: event_time
    columns: {user_id: int64, amount: double, qty: int64, category: string, member: bool}
feature_views:
  - name: activity
    entities: [user]
    source: clicks
    step: 2s
    aggregations:
      - {name: clicks_2s, function: count, window: 2s}
      - {name: spend_6s, function: sum, column: amount, window: 6s}
      - {name: qty_6s, function: sum, column: qty, window: 6s}
      - {name: mean_spend_6s, function: mean, column: amount, window: 6s}
      - {name: min_qty_6s, function: min, column: qty, window: 6s}
      - {name: max_spend_6s, function: max, column: amount, window: 6s}
      - {name: last_category_6s, function: last, column: category, window: 6s}
      - {name: last_amount_6s, function: last, column: amount, window: 6s}
      - {name: categories_2s, function: count_distinct, column: category, window: 2s}
  - name: recent
    entities: [user]
    source: clicks
    step: 3s
    aggregations:
      - {name: clicks_4s, function: count, window: 4s}
      - {name: last_member_4s, function: last, column: member, window: 4s}
      - {name: mean_qty_3s, function: mean, column: qty, window: 3s}
"""
DEFS = definitions.parse(DEFINITIONS)
SOURCE = DEFS.sources["clicks"]
VIEWS = [DEFS.feature_views["activity"], DEFS.feature_views["recent"]]


# ---- the cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlinkCluster]:
    if not flinkenv.provisioned(ENV):
        message = (
            f"the Flink environment {ENV} is not provisioned: run scripts/setup.sh "
            "(python -m mlmesh_features.streaming.flinkenv)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    home = tmp_path_factory.mktemp("flink")
    # Flink binds its REST and RPC ports itself and cannot take port 0: a
    # random pair, another if it is taken (as the chassis' Redis helper does).
    for _ in range(5):
        port = random.randrange(20000, 59998)
        flink = FlinkCluster(home, ENV, rest_port=port)
        try:
            started = time.monotonic()
            flink.start()
        except FlinkError:
            continue
        print(f"cluster started in {time.monotonic() - started:.1f} s")
        yield flink
        flink.stop()
        return
    raise RuntimeError("the Flink cluster found no free ports in 5 tries")


# ---- the event stream ------------------------------------------------------------


class Stream:
    """Generated events, written to the event log one file at a time."""

    def __init__(self, root: Path, seed: int) -> None:
        self.directory = eventlog.source_directory(root, SOURCE.name)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.seq = 1
        self.now = T0 + 500  # the stream's clock (ms): the highest time so far
        self.max_written = 0  # the highest event time in the log
        # Each event by _seq, with the highest event time of the log once
        # its file was written.
        self.written: dict[int, tuple[dict[str, Any], int]] = {}

    def event(self, time_ms: int, user: int | None = None) -> dict[str, Any]:
        rng = self.rng
        return {
            "user_id": rng.randrange(1, 5) if user is None else user,
            "amount": None if rng.random() < 0.1 else rng.randrange(-40, 400) / 4,
            "qty": None if rng.random() < 0.1 else rng.randrange(0, 20),
            "category": None if rng.random() < 0.1 else rng.choice("abcde"),
            "member": None if rng.random() < 0.1 else rng.random() < 0.5,
            "_event_time_ms": time_ms,
        }

    def batch(self, count: int = 30, late: int = 3) -> list[dict[str, Any]]:
        """``count`` events over the next second or so, out of order within
        the delay, and ``late`` events well behind the watermark."""
        events = []
        for _ in range(count):
            self.now += self.rng.randrange(0, 80)
            events.append(self.event(self.now - self.rng.randrange(0, DELAY_MS // 3)))
        # User 7's events come three at a time, at one time: _seq decides
        # which is `last`.
        time_ms = self.now - self.rng.randrange(0, DELAY_MS // 3)
        events += [self.event(time_ms, user=7) for _ in range(3)]
        for _ in range(late):
            events.append(self.event(self.now - DELAY_MS - self.rng.randrange(1000, 4000)))
        self.now += 1
        events.append(self.event(self.now))  # the file's highest event time
        self.rng.shuffle(events)
        return events

    def write(self, events: list[dict[str, Any]]) -> None:
        """One event-log file, as IngestEvents writes it."""
        first = self.seq
        self.seq += len(events)
        lines = [json.dumps({**event, "_seq": first + i}) for i, event in enumerate(events)]
        name = f"{first:020d}-{len(events)}.jsonl"
        temporary = self.directory / f".{name}.tmp"
        temporary.write_text("\n".join(lines) + "\n")
        os.replace(temporary, self.directory / name)
        self.max_written = max([self.max_written, *(e["_event_time_ms"] for e in events)])
        for i, event in enumerate(events):
            self.written[first + i] = (event, self.max_written)

    def feed(self, cluster: FlinkCluster, job_id: str, files: int) -> None:
        """Writes ``files`` files, each once the job has read the one before
        (its watermark has passed that file's highest event time less the
        delay): the job reads them in the order written."""
        for _ in range(files):
            self.write(self.batch())
            self.wait_read(cluster, job_id)

    def wait_read(self, cluster: FlinkCluster, job_id: str) -> None:
        """Waits until the job has read the log's highest event time."""
        target = self.max_written - DELAY_MS
        cluster.wait_for(
            lambda: (cluster.watermark(job_id) or -1) >= target, "the job to read the log", 60
        )

    def late_by_policy(self) -> set[int]:
        """The _seq of every event the watermark policy refuses, in the order
        written: at or behind the highest event time before it less the delay."""
        late, highest = set(), None
        for seq in sorted(self.written):
            time_ms = self.written[seq][0]["_event_time_ms"]
            if highest is not None and time_ms <= highest - DELAY_MS:
                late.add(seq)
            highest = time_ms if highest is None else max(highest, time_ms)
        return late

    def flush(self) -> int:
        """An event far ahead (of a user of its own): the watermark passes every
        window end before it. Returns that watermark."""
        far = self.now + 60_000
        self.write([self.event(far, user=99)])
        return far - DELAY_MS


# ---- the job and its output ------------------------------------------------------


def submit(cluster: FlinkCluster, root: Path, from_checkpoint: str | None = None) -> str:
    spec = jobspec.compile_spec(DEFS, root, checkpoint_interval_ms=500, watermark_delay_ms=DELAY_MS)
    path = root / "streaming" / "job.json"
    jobspec.write_spec(spec, path)
    started = time.monotonic()
    job_id = cluster.submit(Path(job.__file__), path, from_checkpoint=from_checkpoint)
    cluster.wait_for(lambda: cluster.job_running(job_id), f"job {job_id} to run")
    print(f"job submitted and running in {time.monotonic() - started:.1f} s")
    return job_id


def committed(directory: Path) -> list[dict[str, Any]]:
    if not directory.exists():
        return []
    rows = []
    for path in sorted(directory.iterdir()):
        if not path.name.startswith((".", "_")):
            rows += [json.loads(line) for line in path.read_text().splitlines() if line]
    return rows


def late_events(root: Path) -> list[dict[str, Any]]:
    return committed(root / "stream_late" / SOURCE.name)


def reference(root: Path, view: definitions.FeatureView, watermark: int) -> pd.DataFrame:
    """The batch path's rows over the log's events less the late output's,
    at the window ends the watermark has passed."""
    events = eventlog.read_events(root, SOURCE)
    late = {row["_seq"] for row in late_events(root)}
    events = events[~events["_seq"].isin(late)].reset_index(drop=True)
    rows = batch.compute_view(DEFS, view, events.drop(columns=["_seq"]))
    rows["window_end_ms"] = rows.pop(batch.EVENT_TIMESTAMP).astype("int64") // 1_000_000
    return rows[rows["window_end_ms"] <= watermark]


def mismatches(root: Path, view: definitions.FeatureView, watermark: int) -> list[str]:
    """How the job's committed output for ``view`` differs from the batch
    path's (empty when it agrees)."""
    keys = [*DEFS.join_keys(view), "window_end_ms"]
    expected = {
        tuple(row[k] for k in keys): row
        for row in reference(root, view, watermark).to_dict("records")
    }
    got: dict[tuple[Any, ...], dict[str, Any]] = {}
    problems = []
    for row in committed(root / "stream_out" / view.name):
        key = tuple(row[k] for k in keys)
        if key in got:
            problems.append(f"{view.name} {key}: written twice: {got[key]} and {row}")
        got[key] = row
    for key in sorted(set(expected) | set(got)):
        if key not in got:
            problems.append(f"{view.name} {key}: missing (batch: {expected[key]})")
        elif key not in expected:
            problems.append(f"{view.name} {key}: not in batch: {got[key]}")
        else:
            for aggregation in view.aggregations:
                want, have = expected[key][aggregation.name], got[key][aggregation.name]
                if not same(want, have, aggregation.function == "mean"):
                    problems.append(f"{view.name} {key} {aggregation.name}: {have} != {want}")
    return problems


def same(want: Any, have: Any, relative: bool) -> bool:
    """Whether the job's JSON value ``have`` is the batch value ``want``."""
    if want is None or want is pd.NA or (isinstance(want, float) and math.isnan(want)):
        return have is None
    if have is None or isinstance(have, bool) != isinstance(want, bool | np.bool_):
        return False
    if relative:
        return math.isclose(want, have, rel_tol=1e-9, abs_tol=0.0)
    return bool(want == have)


def assert_agrees_with_batch(root: Path, watermark: int) -> None:
    """Waits for the job's output to agree with the batch path, then checks
    the late output: non-empty, and only events behind the watermark."""
    deadline = time.monotonic() + OUTPUT_TIMEOUT_S
    while True:
        problems = [p for view in VIEWS for p in mismatches(root, view, watermark)]
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not problems, f"{len(problems)} differences, first ones:\n" + "\n".join(problems[:20])


def assert_late_output_is_late(root: Path, stream: Stream, exact: bool) -> None:
    """The late output is not empty, holds each event once and as written,
    and only events behind the watermark: exactly those the policy names
    where the job read the files in the order written (``exact``), else
    events at or behind the log's highest event time less the delay."""
    late = late_events(root)
    assert late, "no event was judged late"
    seqs = [row["_seq"] for row in late]
    assert len(seqs) == len(set(seqs)), "a late event was written twice"
    for row in late:
        event, _ = stream.written[row["_seq"]]
        assert row == {**event, "_seq": row["_seq"]}
        assert row["_event_time_ms"] <= stream.max_written - DELAY_MS, row
    if exact:
        assert set(seqs) == stream.late_by_policy()


# ---- the tests --------------------------------------------------------------------


def test_the_job_spec_holds_the_windowed_views_over_streams(tmp_path: Path) -> None:
    # A row view, and a windowed view over a batch source: neither streams.
    archive = "  - {name: archive, path: a.pq, timestamp_field: t, columns: {user_id: int64}}\n"
    text = DEFINITIONS.replace("sources:\n", "sources:\n" + archive) + (
        "  - name: rows\n"
        "    entities: [user]\n"
        "    source: clicks\n"
        '    features: [{name: double_qty, type: int64, expression: "qty * 2"}]\n'
        "  - name: history\n"
        "    entities: [user]\n"
        "    source: archive\n"
        "    step: 1h\n"
        "    aggregations: [{name: n_1d, function: count, window: 1d}]\n"
    )
    spec = jobspec.compile_spec(definitions.parse(text), tmp_path, watermark_delay_ms=1500)
    assert spec["watermark_delay_ms"] == 1500
    assert list(spec["sources"]) == ["clicks"]
    assert spec["sources"]["clicks"] == {
        "path": str(tmp_path / "eventlog" / "clicks"),
        "columns": SOURCE.columns,
        "late_output": str(tmp_path / "stream_late" / "clicks"),
    }
    assert [v["name"] for v in spec["views"]] == ["activity", "recent"]
    recent = spec["views"][1]
    assert recent["keys"] == ["user_id"] and recent["step_ms"] == 3000
    assert recent["output"] == str(tmp_path / "stream_out" / "recent")
    assert recent["aggregations"][1] == {
        "name": "last_member_4s",
        "function": "last",
        "column": "member",
        "window_ms": 4000,
        "type": "bool",
    }
    assert recent["aggregations"][0]["column"] is None
    path = tmp_path / "streaming" / "job.json"
    jobspec.write_spec(spec, path)
    assert json.loads(path.read_text()) == spec
    assert [p.name for p in path.parent.iterdir()] == ["job.json"]
    # One window operator per view, each sized to its longest window in
    # whole steps (4s over 3s steps: 6s, cut back to 4s by its filter).
    _, inserts = job.statements(spec)
    assert len(inserts) == 3  # the late events, and the two views
    assert "INTERVAL '0 00:00:06.000' DAY(3) TO SECOND(3)))" in inserts[2]
    assert "_event_time_ms >= " in inserts[2] and "- 4000) AS _in_longest" in inserts[2]


@pytest.mark.timeout(180)
def test_the_streaming_output_equals_the_batch_path(cluster: FlinkCluster, tmp_path: Path) -> None:
    stream = Stream(tmp_path, seed=1)
    job_id = submit(cluster, tmp_path)
    try:
        # One reading of the log and one judge of lateness, shared by the
        # late output and both views (so all see the same order).
        vertices = cluster.vertices(job_id)
        assert sum(name.startswith("Source: ") for name in vertices) == 1, vertices
        assert sum("OverAggregate" in name for name in vertices) == 1, vertices
        stream.feed(cluster, job_id, files=8)
        watermark = stream.flush()
        assert_agrees_with_batch(tmp_path, watermark)
        assert_late_output_is_late(tmp_path, stream, exact=True)
    finally:
        cluster.cancel(job_id)


@pytest.mark.timeout(240)
def test_a_killed_taskmanager_neither_loses_nor_repeats_an_event(
    cluster: FlinkCluster, tmp_path: Path
) -> None:
    stream = Stream(tmp_path, seed=2)
    job_id = submit(cluster, tmp_path)
    try:
        stream.feed(cluster, job_id, files=4)
        # Mid-stream: windows open, rows written but not yet committed, the
        # latest file read after the latest checkpoint (or not).
        cluster.wait_for(lambda: committed(tmp_path / "stream_out" / "activity"), "output")
        stream.write(stream.batch())
        stream.wait_read(cluster, job_id)
        cluster.kill_taskmanager()
        stream.write(stream.batch())  # while the job is down
        started = time.monotonic()
        cluster.start_taskmanager()
        cluster.wait_for(lambda: cluster.job_running(job_id), "the job to run again")
        print(f"recovered in {time.monotonic() - started:.1f} s")
        assert cluster.restarts(job_id) >= 1
        assert cluster.restored_from(job_id) is not None
        stream.feed(cluster, job_id, files=3)
        watermark = stream.flush()
        assert_agrees_with_batch(tmp_path, watermark)
        assert_late_output_is_late(tmp_path, stream, exact=False)
    finally:
        cluster.cancel(job_id)


@pytest.mark.timeout(240)
def test_a_job_resumed_from_its_checkpoint_neither_loses_nor_repeats_an_event(
    cluster: FlinkCluster, tmp_path: Path
) -> None:
    stream = Stream(tmp_path, seed=3)
    job_id = submit(cluster, tmp_path)
    try:
        stream.feed(cluster, job_id, files=4)
        stream.write(stream.batch())
    finally:
        cluster.cancel(job_id)
    checkpoint = cluster.latest_checkpoint(job_id)
    assert checkpoint is not None
    stream.write(stream.batch())  # while no job runs
    job_id = submit(cluster, tmp_path, from_checkpoint=checkpoint)
    try:
        assert cluster.restored_from(job_id) == checkpoint
        stream.feed(cluster, job_id, files=3)
        watermark = stream.flush()
        assert_agrees_with_batch(tmp_path, watermark)
        assert_late_output_is_late(tmp_path, stream, exact=False)
    finally:
        cluster.cancel(job_id)

"""`python -m mlmesh_features.streaming.supervisor --root DIR --home DIR`:
the streaming path under the runner, in the foreground.

1. Writes the job spec (``<root>/streaming/job.json``) from the definitions
   in force.
2. Starts the standalone Flink cluster (``cluster.FlinkCluster``: a
   jobmanager and a taskmanager, checkpoints under ``<home>/checkpoints``).
3. Submits the job (``job.py``), from the newest retained checkpoint when an
   earlier run left one (so a restarted mesh neither loses nor recounts an
   event; a checkpoint the job cannot restore from, e.g. after the
   definitions changed, is skipped for a fresh start).
4. With ``--demo``, streams demo events into each stream source's event log
   at wall-clock time (a few a second), so the online store shows fresh
   streamed values.
5. Answers readiness on a loopback HTTP port of its own (200 once the job
   runs), and exits non-zero when the job fails or the cluster dies (the
   runner restarts it, and the job resumes from its checkpoint).

SIGTERM (the runner's Ctrl-C) stops the demo streamer, cancels the job (its
checkpoints are retained) and stops the cluster.

**External mode** (``--jobmanager http://HOST:REST_PORT``: a cluster run as
separate processes or containers, ``python -m mlmesh_features.streaming.cluster
jobmanager|taskmanager``): the supervisor starts and stops no cluster. It waits
for the jobmanager and a taskmanager, asks the jobmanager where checkpoints go
(``execution.checkpointing.dir``: a folder this process must see at the same
path), cancels a leftover job of its own (``cluster.JOB_NAME``, e.g. from a
supervisor that was killed), submits from the newest retained checkpoint,
streams the demo events and serves readiness as above; SIGTERM cancels the
job (checkpoints retained) and leaves the cluster up. ``--ready-port`` fixes
the readiness port (a container's health check); 0 is the kernel's choice.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import signal
import socket
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mlmesh_features import expressions as ex
from mlmesh_features.definitions import Definitions, Source
from mlmesh_features.store import FeatureStore
from mlmesh_features.streaming import flinkenv, jobspec
from mlmesh_features.streaming.cluster import (
    JOB_NAME,
    FlinkCluster,
    FlinkError,
    FlinkRest,
    check_host,
    check_port,
)
from mlmesh_features.streaming.eventlog import EventLog

log = logging.getLogger("mlmesh.features.streaming")

JOB = Path(__file__).with_name("job.py")
# Demo events: how many users, and events per second per stream source.
DEMO_USERS = 20
DEMO_RATE = 4.0


def job_spec_path(root: Path) -> Path:
    return root / "streaming" / "job.json"


def latest_retained_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint under ``checkpoints`` (``<job>/chk-N``
    folders holding a ``_metadata`` file), or None."""
    found = [
        (meta.stat().st_mtime_ns, meta.parent)
        for meta in checkpoints.glob("*/chk-*/_metadata")
        if meta.is_file()
    ]
    return max(found)[1] if found else None


def free_port_pair() -> int:
    """A loopback port p with p + 1 free too (Flink's REST and RPC ports)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise OSError("no two adjacent free ports")


class Streaming:
    """The cluster (its own, or an external one at ``jobmanager``), its job
    and the demo streamer."""

    def __init__(
        self,
        root: Path,
        home: Path,
        env: Path,
        *,
        demo: bool,
        jobmanager: str | None = None,
        wait_s: float = 300.0,
    ) -> None:
        self.root = root
        self.home = home
        self.env = env
        self.demo = demo
        self.jobmanager = jobmanager
        self.wait_s = wait_s
        self.cluster: FlinkRest | None = None
        self._local: FlinkCluster | None = None
        self.job_id: str | None = None
        self.stopping = threading.Event()
        self._streamer: threading.Thread | None = None

    def definitions(self) -> Definitions:
        return FeatureStore(self.root).definitions

    def start(self) -> None:
        defs = self.definitions()
        spec = jobspec.compile_spec(defs, self.root)
        if not spec["views"]:
            log.info("no streamed views in the definitions in force: no Flink job to run")
            return
        if self.jobmanager is not None:
            # An image's Flink env carries no pins' stamp: its pieces must be there.
            if not flinkenv.usable(self.env):
                raise FlinkError(f"no Flink distribution and Java in {self.env}")
        elif not flinkenv.provisioned(self.env):
            # The rest of the mesh runs; the streamed views keep their batch values.
            log.error(
                "the Flink environment %s is not provisioned (python -m "
                "mlmesh_features.streaming.flinkenv): streaming is off",
                self.env,
            )
            return
        path = job_spec_path(self.root)
        jobspec.write_spec(spec, path)
        for source in spec["sources"].values():
            # Flink's file source fails on a folder that is not there yet.
            Path(source["path"]).mkdir(parents=True, exist_ok=True)
        if self.jobmanager is not None:
            self.cluster = self._external(self.jobmanager)
        else:
            self._local = self.cluster = FlinkCluster(self.home, self.env, free_port_pair())
            self._local.start()
            log.info("flink cluster up: %s", self.cluster.url)
        self.job_id = self._submit(path)
        if self.demo:
            sources = [defs.sources[name] for name in spec["sources"]]
            self._streamer = threading.Thread(
                target=self._stream_demo, args=(sources,), name="demo-events", daemon=True
            )
            self._streamer.start()

    def _external(self, url: str) -> FlinkRest:
        """The external cluster at ``url``, once it is up, with no job of ours
        left running on it."""
        cluster = FlinkRest(url, self.home, self.env)
        cluster.prepare_client()
        log.info("waiting for the flink cluster at %s", cluster.url)
        cluster.wait_until_up(self.wait_s)
        checkpoints = cluster.checkpoints_from_jobmanager()
        log.info("flink cluster up: %s (checkpoints in %s)", cluster.url, checkpoints)
        for job_id, state in cluster.jobs_named(JOB_NAME):
            if state not in ("CANCELED", "FAILED", "FINISHED"):
                # A supervisor killed before it could cancel left it running:
                # two jobs would write the same output.
                log.warning("cancelling job %s (%s) left by an earlier run", job_id, state)
                cluster.cancel(job_id)
        return cluster

    def _submit(self, spec: Path) -> str:
        assert self.cluster is not None
        checkpoint = latest_retained_checkpoint(self.cluster.checkpoint_dir)
        if checkpoint is not None:
            try:
                job_id = self.cluster.submit(JOB, spec, str(checkpoint))
                self.cluster.wait_for(lambda: self._alive(job_id), "the job to run")
                log.info("job %s resumed from %s", job_id, checkpoint)
                return job_id
            except FlinkError as error:
                log.warning("cannot resume from %s (%s); starting afresh", checkpoint, error)
        job_id = self.cluster.submit(JOB, spec)
        self.cluster.wait_for(lambda: self._alive(job_id), "the job to run")
        log.info("job %s started", job_id)
        return job_id

    def _alive(self, job_id: str) -> bool:
        assert self.cluster is not None
        state = self.cluster.job_state(job_id)
        if state in ("FAILED", "CANCELED", "FINISHED"):
            raise FlinkError(f"job {job_id} is {state}")
        return self.cluster.job_running(job_id)

    def ready(self) -> bool:
        if self.cluster is None:
            return self.job_id is None  # nothing to stream: ready as it is
        return self.job_id is not None and self.cluster.job_running(self.job_id)

    def check(self) -> None:
        """Raises FlinkError when the job has failed for good or is gone."""
        if self.cluster is not None and self.job_id is not None:
            state = self.cluster.job_state(self.job_id)
            if state in ("FAILED", "CANCELED", "FINISHED", "SUSPENDED"):
                raise FlinkError(f"job {self.job_id} is {state}")

    def _stream_demo(self, sources: list[Source]) -> None:
        """A few events a second per source, at wall-clock time, for a small
        set of users (so windows hold several)."""
        events = EventLog(self.root)
        rng = random.Random()
        while not self.stopping.wait(1.0 / DEMO_RATE):
            for source in sources:
                event = {c: _demo_value(c, k, rng) for c, k in source.columns.items()}
                event[source.timestamp_field] = datetime.now(UTC)
                try:
                    events.append(source, [event])
                except (OSError, ValueError):
                    log.exception("appending a demo event to %s failed", source.name)

    def stop(self) -> None:
        self.stopping.set()
        if self._streamer is not None:
            self._streamer.join(5)
        if self.cluster is None:
            return
        if self.job_id is not None:
            with contextlib.suppress(FlinkError, OSError):
                self.cluster.cancel(self.job_id)  # its checkpoints are retained
                log.info("job %s cancelled", self.job_id)
        if self._local is not None:
            self._local.stop()
            log.info("flink cluster stopped")


class Stopped(Exception):
    """SIGTERM or SIGINT arrived."""


def _demo_value(column: str, kind: str, rng: random.Random) -> Any:
    if kind == ex.INT64:
        return rng.randrange(1, DEMO_USERS + 1)
    if kind == ex.DOUBLE:
        return round(rng.lognormvariate(3.0, 1.0), 2)
    if kind == ex.BOOL:
        return rng.random() < 0.3
    return rng.choice(["home", "search", "product", "cart", "checkout"])


def _serve_readiness(
    streaming: Streaming, host: str = "127.0.0.1", port: int = 0
) -> ThreadingHTTPServer:
    """GET / on ``host:port``: 200 once the job runs, 503 before."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                ready = streaming.ready()
            except (FlinkError, OSError):
                ready = False
            body = b"running\n" if ready else b"starting\n"
            self.send_response(200 if ready else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="readiness", daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="the features root")
    parser.add_argument("--home", type=Path, required=True, help="the Flink cluster's folder")
    parser.add_argument("--env", type=Path, default=flinkenv.DEFAULT_ENV)
    parser.add_argument("--demo", action="store_true", help="stream demo events")
    parser.add_argument(
        "--jobmanager",
        default=None,
        help="http://HOST:REST_PORT of an external cluster (start and stop none)",
    )
    parser.add_argument("--ready-host", default="127.0.0.1", help="the readiness address")
    parser.add_argument("--ready-port", type=int, default=0, help="0: the kernel's choice")
    parser.add_argument(
        "--wait", type=float, default=300.0, help="seconds to wait for an external cluster"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s flink %(message)s")
    try:
        if args.jobmanager is not None:
            FlinkRest(args.jobmanager, args.home, args.env)  # checks the URL
        ready_host = check_host(args.ready_host)
        ready_port = check_port(args.ready_port, zero=True)
        if not 1.0 <= args.wait <= 3600.0:
            raise ValueError(f"--wait must be 1 to 3600 seconds: {args.wait}")
    except ValueError as error:
        parser.error(str(error))
    streaming = Streaming(
        args.root,
        args.home,
        args.env,
        demo=args.demo,
        jobmanager=args.jobmanager,
        wait_s=args.wait,
    )
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()
        if not streaming.stopping.is_set():
            raise Stopped  # out of a start that may wait minutes; cleanup follows

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    readiness = _serve_readiness(streaming, ready_host, ready_port)
    failed = False
    try:
        streaming.start()
        misses = 0
        while not stop.wait(2.0):
            try:
                streaming.check()
                misses = 0
            except FlinkError:
                misses += 1  # a slow REST answer is not yet a dead job
                if misses >= 3:
                    raise
    except FlinkError as error:
        log.error("%s", error)
        failed = True
    except Stopped:
        log.info("stopping")
    finally:
        readiness.shutdown()
        streaming.stop()
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()

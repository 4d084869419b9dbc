"""A local standalone Flink cluster: a jobmanager and a taskmanager, each its
own process, started from PyFlink's distribution in the Flink environment
(flinkenv.py), with checkpoints on local disk.

Everything lives under ``home``::

    conf/config.yaml    generated (FLINK_CONF_DIR): ports, memory, checkpoints
    log/                the processes' logs (jobmanager.out, taskmanager-N.out)
    checkpoints/        retained checkpoints (file://), one folder per job
    tmp/                Flink's io.tmp.dirs

The REST port is the caller's (Flink binds it itself and cannot take 0);
the jobmanager's RPC port is the next one. Every other port (blob server,
taskmanager RPC and data) is the kernel's choice. Jobs restart at a fixed
delay, without limit, from their latest checkpoint: a killed taskmanager's
job runs again as soon as a new taskmanager registers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from mlmesh_features.streaming import flinkenv

# Sized for a small machine shared with other services (2 cores): the
# hashmap state backend keeps state on the task heap, so managed memory
# (RocksDB, batch sorting) is kept small.
JOBMANAGER_MEMORY = "768m"
TASKMANAGER_MEMORY = "1024m"
TASK_SLOTS = 2
START_TIMEOUT_S = 90.0
SUBMIT_TIMEOUT_S = 180.0
_JOB_ID = re.compile(r"JobID ([0-9a-f]{32})")
_WATERMARK_METRIC = re.compile(r"[0-9]+\.WatermarkAssigner\[[0-9]+\]\.currentOutputWatermark")


class FlinkError(RuntimeError):
    """The cluster did not do what was asked (its log has the details)."""


class FlinkCluster:
    def __init__(self, home: Path, env: Path, rest_port: int) -> None:
        self.home = home.resolve()
        self.env = env.resolve()
        self.rest_port = rest_port
        self.rpc_port = rest_port + 1
        self.flink_home = flinkenv.flink_home(self.env)
        self._jobmanager: subprocess.Popen[bytes] | None = None
        self._taskmanagers: list[subprocess.Popen[bytes]] = []
        self._started_taskmanagers = 0

    # ---- processes ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def conf_dir(self) -> Path:
        return self.home / "conf"

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def checkpoint_dir(self) -> Path:
        return self.home / "checkpoints"

    def start(self) -> None:
        """Starts the jobmanager and one taskmanager; returns once the REST API
        answers and the taskmanager has registered."""
        if not flinkenv.provisioned(self.env):
            raise FlinkError(
                f"the Flink environment {self.env} is not provisioned: run "
                f"python -m mlmesh_features.streaming.flinkenv --env {self.env}"
            )
        self._write_conf()
        self._jobmanager = self._spawn("jobmanager", "jobmanager")
        try:
            self._wait(lambda: self._rest("/overview") is not None, "the REST API")
            self.start_taskmanager()
        except BaseException:
            self.stop()
            raise

    def start_taskmanager(self) -> None:
        """Starts a taskmanager and waits until it has registered."""
        before = self._registered()
        self._started_taskmanagers += 1
        name = f"taskmanager-{self._started_taskmanagers}"
        self._taskmanagers.append(self._spawn("taskmanager", name))
        self._wait(lambda: bool(self._registered() - before), f"{name} to register")

    def kill_taskmanager(self) -> None:
        """SIGKILLs the newest running taskmanager (a crash: no clean shutdown)."""
        for process in reversed(self._taskmanagers):
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return
        raise FlinkError("no taskmanager is running")

    def stop(self) -> None:
        """Stops every process of the cluster (SIGTERM, then SIGKILL)."""
        processes = [*self._taskmanagers, *([self._jobmanager] if self._jobmanager else [])]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._taskmanagers.clear()
        self._jobmanager = None

    def _spawn(self, service: str, name: str) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.out", "ab") as out:
            # start-foreground execs the JVM: the process is the JVM itself.
            return subprocess.Popen(
                ["bash", str(self.flink_home / "bin" / f"{service}.sh"), "start-foreground"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(),
                cwd=self.home,
            )

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FLINK_HOME=str(self.flink_home),
            FLINK_CONF_DIR=str(self.conf_dir),
            FLINK_LOG_DIR=str(self.log_dir),
            FLINK_PID_DIR=str(self.home),
            JAVA_HOME=str(flinkenv.java_home(self.env)),
            PATH=f"{self.env / 'bin'}:{env.get('PATH', '')}",
        )
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        return env

    def _write_conf(self) -> None:
        for folder in (self.conf_dir, self.log_dir, self.checkpoint_dir, self.home / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        for name in ("log4j-console.properties", "log4j-cli.properties", "log4j.properties"):
            shutil.copyfile(self.flink_home / "conf" / name, self.conf_dir / name)
        # Flink 2 reads config.yaml (flat dotted keys are valid YAML mappings).
        conf = {
            "jobmanager.rpc.address": "127.0.0.1",
            "jobmanager.rpc.port": self.rpc_port,
            "jobmanager.bind-host": "127.0.0.1",
            "jobmanager.memory.process.size": JOBMANAGER_MEMORY,
            "taskmanager.bind-host": "127.0.0.1",
            "taskmanager.host": "127.0.0.1",
            "taskmanager.numberOfTaskSlots": TASK_SLOTS,
            "taskmanager.memory.process.size": TASKMANAGER_MEMORY,
            "taskmanager.memory.managed.size": "64m",
            "taskmanager.memory.network.min": "64m",
            "taskmanager.memory.network.max": "64m",
            "parallelism.default": 1,
            "rest.address": "127.0.0.1",
            "rest.bind-address": "127.0.0.1",
            "rest.port": self.rest_port,
            "rest.bind-port": str(self.rest_port),
            "blob.server.port": "0",
            "io.tmp.dirs": str(self.home / "tmp"),
            "state.backend.type": "hashmap",
            "execution.checkpointing.dir": (self.checkpoint_dir).as_uri(),
            "execution.checkpointing.externalized-checkpoint-retention": ("RETAIN_ON_CANCELLATION"),
            "execution.checkpointing.num-retained": 2,
            "restart-strategy.type": "fixed-delay",
            "restart-strategy.fixed-delay.attempts": 2147483647,
            "restart-strategy.fixed-delay.delay": "1 s",
            # A killed taskmanager is noticed in seconds, not the default 50.
            # The REST API's view of task metrics (records read...) refreshes fast.
            "metrics.fetcher.update-interval": 200,
            "heartbeat.interval": 2000,
            "heartbeat.timeout": 10000,
            "env.java.opts.all": _java_opts(self.flink_home),
        }
        text = "".join(f"{key}: {json.dumps(value)}\n" for key, value in conf.items())
        (self.conf_dir / "config.yaml").write_text(text)

    # ---- jobs ---------------------------------------------------------------------

    def submit(self, job: Path, job_spec: Path, from_checkpoint: str | None = None) -> str:
        """Submits the PyFlink program ``job`` (detached) with ``job_spec`` as
        its argument, from a retained checkpoint if given; returns the job id."""
        python = str(flinkenv.python_of(self.env))
        command = [
            "bash",
            str(self.flink_home / "bin" / "flink"),
            "run",
            "--detached",
            "-m",
            f"127.0.0.1:{self.rest_port}",
            *(["--fromSavepoint", from_checkpoint] if from_checkpoint else []),
            "-pyexec",
            python,
            "-pyclientexec",
            python,
            "-py",
            str(job),
            str(job_spec),
        ]
        with open(self.log_dir / "submit.out", "ab") as out:
            done = subprocess.run(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                cwd=self.home,
                timeout=SUBMIT_TIMEOUT_S,
            )
            out.write(done.stdout)
        text = done.stdout.decode(errors="replace")
        match = _JOB_ID.search(text)
        if done.returncode != 0 or match is None:
            raise FlinkError(f"flink run failed ({done.returncode}): {text[-2000:]}")
        return match.group(1)

    def job_state(self, job_id: str) -> str:
        """The job's state: RUNNING, RESTARTING, CANCELED, FAILED..."""
        job = self._rest(f"/jobs/{job_id}")
        if job is None:
            raise FlinkError(f"job {job_id} is unknown")
        return str(job["state"])

    def job_running(self, job_id: str) -> bool:
        """Whether the job and every one of its tasks are running."""
        job = self._rest(f"/jobs/{job_id}")
        return (
            job is not None
            and job["state"] == "RUNNING"
            and all(vertex["status"] == "RUNNING" for vertex in job["vertices"])
        )

    def vertices(self, job_id: str) -> list[str]:
        """The names of the job's vertices (chains of operators)."""
        job = self._rest(f"/jobs/{job_id}")
        return [str(vertex["name"]) for vertex in (job or {}).get("vertices", [])]

    def latest_checkpoint(self, job_id: str) -> str | None:
        """The external path of the job's latest completed checkpoint."""
        checkpoints = self._rest(f"/jobs/{job_id}/checkpoints")
        latest = (checkpoints or {}).get("latest", {}).get("completed")
        return str(latest["external_path"]) if latest else None

    def restored_from(self, job_id: str) -> str | None:
        """The external path of the checkpoint the job last restored from."""
        checkpoints = self._rest(f"/jobs/{job_id}/checkpoints")
        restored = (checkpoints or {}).get("latest", {}).get("restored")
        return str(restored["external_path"]) if restored else None

    def restarts(self, job_id: str) -> int:
        """How many times the job failed and restarted (its exception history)."""
        history = self._rest(f"/jobs/{job_id}/exceptions") or {}
        return len(history.get("exceptionHistory", {}).get("entries", []))

    def completed_checkpoints(self, job_id: str) -> int:
        checkpoints = self._rest(f"/jobs/{job_id}/checkpoints")
        return int((checkpoints or {}).get("counts", {}).get("completed", 0))

    def watermark(self, job_id: str) -> int | None:
        """The highest watermark (epoch ms) the job's watermark assigners have
        emitted, as the REST API last fetched it; None before the first."""
        job = self._rest(f"/jobs/{job_id}")
        marks = []
        for vertex in (job or {}).get("vertices", []):
            path = f"/jobs/{job_id}/vertices/{vertex['id']}/metrics"
            names = [
                m["id"] for m in self._rest(path) or [] if _WATERMARK_METRIC.fullmatch(m["id"])
            ]
            if names:
                for metric in self._rest(f"{path}?get={','.join(names)}") or []:
                    value = int(metric["value"])
                    if value > -(2**62):  # Long.MIN_VALUE: none yet
                        marks.append(value)
        return max(marks, default=None)

    def cancel(self, job_id: str) -> None:
        """Cancels the job (its checkpoints are retained) and waits until it is."""
        request = urllib.request.Request(f"{self.url}/jobs/{job_id}?mode=cancel", method="PATCH")
        with urllib.request.urlopen(request, timeout=10):
            pass
        self._wait(lambda: self.job_state(job_id) == "CANCELED", f"job {job_id} to cancel")

    def wait_for(self, ready: Any, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        self._wait(ready, what, timeout_s)

    # ---- REST ---------------------------------------------------------------------

    def _registered(self) -> set[str]:
        """The ids of the taskmanagers registered with the jobmanager."""
        overview = self._rest("/taskmanagers")
        return {tm["id"] for tm in overview["taskmanagers"]} if overview else set()

    def _rest(self, path: str) -> Any:
        """The REST API's JSON answer, or None if it is not up (or 404)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def _wait(self, ready: Any, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._jobmanager is not None and self._jobmanager.poll() is not None:
                raise FlinkError(f"the jobmanager exited; see {self.log_dir}")
            if ready():
                return
            time.sleep(0.2)
        raise FlinkError(
            f"timed out after {timeout_s:.0f} s waiting for {what}; see {self.log_dir}"
        )


def _java_opts(flink_home: Path) -> str:
    """The distribution's JVM options (the module opens Flink needs on Java
    17), from its own config.yaml."""
    default = yaml.safe_load((flink_home / "conf" / "config.yaml").read_text())
    return str(default["env"]["java"]["opts"]["all"])

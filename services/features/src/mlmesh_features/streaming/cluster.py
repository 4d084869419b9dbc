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

**Separate processes (containers)**: the same conf, one process each, in the
foreground (the JVM replaces this process; logs go to stdout and ``log/``)::

    python -m mlmesh_features.streaming.cluster jobmanager --home DIR \
        [--env FLINK_ENV] [--rest-port 18081] [--rpc-port 18082] \
        [--blob-port 18083] [--host 127.0.0.1] [--bind-host 127.0.0.1]
    python -m mlmesh_features.streaming.cluster taskmanager --home DIR \
        --jobmanager HOST [--rpc-port 18082] [--host 127.0.0.1] ...
    python -m mlmesh_features.streaming.cluster check \
        [--jobmanager http://127.0.0.1:18081] [--taskmanagers 1]   # health: exit 0/1

Each writes its conf to ``<home>/conf/<role>/``. The jobmanager's conf names
the checkpoints folder (``<home>/checkpoints``, or ``--checkpoints``): the
jobmanager, every taskmanager and the supervisor must see it at the same
path (a shared volume), and the taskmanagers the features root too (the job
reads the event log and writes its output there). ``FlinkRest`` is the
client side: the supervisor's external mode (``--jobmanager URL``) submits
to and cancels on such a cluster without starting or stopping it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
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
# The job's name (job.py sets pipeline.name): the supervisor cancels a
# leftover of its own on an external cluster before it submits again.
JOB_NAME = "mlmesh-features-streaming"
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_MEMORY = re.compile(r"[1-9][0-9]{0,5}[mg]")
_TERMINAL = ("FAILED", "CANCELED", "FINISHED")


class FlinkError(RuntimeError):
    """The cluster did not do what was asked (its log has the details)."""


# ---- validation (every value here may come from a command line or env) ------------


# A Flink job id (JobID: 16 bytes, printed as 32 hex digits).
JOB_ID = re.compile(r"[0-9a-f]{32}")
# The most a REST answer may hold (a jobs overview, a job's metrics).
MAX_REST_BYTES = 16 * 1024 * 1024


def check_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS name, else ValueError."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host) or ".." in host:
        raise ValueError(f"not a host name or IP address: {host[:80]!r}")
    return host


def check_port(port: int, *, zero: bool = False) -> int:
    """``port`` if it is a TCP port (0, the kernel's choice, where allowed)."""
    if not (0 if zero else 1) <= port <= 65535:
        raise ValueError(f"not a TCP port: {port}")
    return port


def check_memory(size: str) -> str:
    """A Flink memory size like 768m or 1g."""
    if not _MEMORY.fullmatch(size):
        raise ValueError(f"not a memory size like 768m or 1g: {size[:40]!r}")
    return size


def parse_jobmanager_url(url: str) -> tuple[str, int]:
    """(host, port) of ``http://HOST:PORT`` (the jobmanager's REST API)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError as error:
        raise ValueError(f"bad port in {url[:120]!r}") from error
    if (
        parts.scheme != "http"
        or not parts.hostname
        or port is None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
        or parts.password
    ):
        raise ValueError(f"not http://HOST:PORT: {url[:120]!r}")
    return check_host(parts.hostname), check_port(port)


# ---- conf -------------------------------------------------------------------------


def cluster_conf(
    flink_home: Path,
    home: Path,
    *,
    rest_port: int,
    rpc_port: int,
    jobmanager_host: str = "127.0.0.1",
    taskmanager_host: str = "127.0.0.1",
    bind_host: str = "127.0.0.1",
    blob_port: int = 0,
    taskmanager_rpc_port: int = 0,
    taskmanager_data_port: int = 0,
    slots: int = TASK_SLOTS,
    jobmanager_memory: str = JOBMANAGER_MEMORY,
    taskmanager_memory: str = TASKMANAGER_MEMORY,
    checkpoint_dir: Path | None = None,
    tmp_dir: Path | None = None,
) -> dict[str, Any]:
    """The cluster's conf (Flink 2's config.yaml keys). One conf serves every
    role: the jobmanager reads the rest/rpc/blob keys, a taskmanager the
    taskmanager keys and where the jobmanager is, a client the rest keys."""
    checkpoints = (checkpoint_dir or home / "checkpoints").resolve()
    return {
        "jobmanager.rpc.address": check_host(jobmanager_host),
        "jobmanager.rpc.port": check_port(rpc_port),
        "jobmanager.bind-host": check_host(bind_host),
        "jobmanager.memory.process.size": check_memory(jobmanager_memory),
        "taskmanager.bind-host": check_host(bind_host),
        "taskmanager.host": check_host(taskmanager_host),
        "taskmanager.rpc.port": str(check_port(taskmanager_rpc_port, zero=True)),
        "taskmanager.data.port": check_port(taskmanager_data_port, zero=True),
        "taskmanager.numberOfTaskSlots": max(1, min(int(slots), 64)),
        "taskmanager.memory.process.size": check_memory(taskmanager_memory),
        "taskmanager.memory.managed.size": "64m",
        "taskmanager.memory.network.min": "64m",
        "taskmanager.memory.network.max": "64m",
        "parallelism.default": 1,
        "rest.address": check_host(jobmanager_host),
        "rest.bind-address": check_host(bind_host),
        "rest.port": check_port(rest_port),
        "rest.bind-port": str(check_port(rest_port)),
        "blob.server.port": str(check_port(blob_port, zero=True)),
        "io.tmp.dirs": str((tmp_dir or home / "tmp").resolve()),
        "state.backend.type": "hashmap",
        "execution.checkpointing.dir": checkpoints.as_uri(),
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
        "env.java.opts.all": _java_opts(flink_home),
    }


def write_conf(conf_dir: Path, flink_home: Path, conf: dict[str, Any]) -> None:
    """FLINK_CONF_DIR: ``config.yaml`` (written whole: a temporary file renamed
    over it) and the distribution's log4j files."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    for name in ("log4j-console.properties", "log4j-cli.properties", "log4j.properties"):
        shutil.copyfile(flink_home / "conf" / name, conf_dir / name)
    # Flink 2 reads config.yaml (flat dotted keys are valid YAML mappings).
    text = "".join(f"{key}: {json.dumps(value)}\n" for key, value in conf.items())
    temporary = conf_dir / f".config.yaml.{os.getpid()}"
    temporary.write_text(text)
    os.replace(temporary, conf_dir / "config.yaml")


def flink_environment(env: Path, conf_dir: Path, log_dir: Path, pid_dir: Path) -> dict[str, str]:
    """The environment Flink's scripts run in: the Flink env's Java and
    distribution, none of the caller's Python settings."""
    environ = dict(os.environ)
    environ.update(
        FLINK_HOME=str(flinkenv.flink_home(env)),
        FLINK_CONF_DIR=str(conf_dir),
        FLINK_LOG_DIR=str(log_dir),
        FLINK_PID_DIR=str(pid_dir),
        JAVA_HOME=str(flinkenv.java_home(env)),
        PATH=f"{env / 'bin'}:{environ.get('PATH', '')}",
    )
    environ.pop("PYTHONPATH", None)
    environ.pop("VIRTUAL_ENV", None)
    return environ


# ---- a jobmanager's REST API (any cluster) -----------------------------------------


class FlinkRest:
    """A running cluster, through its jobmanager's REST API and the ``flink``
    command line (the Flink env's): submits, watches and cancels jobs. Starts
    and stops nothing.

    ``home`` holds the client's conf (``conf/client``) and the submit log
    (``log/submit.out``). ``checkpoint_dir`` is where the cluster keeps
    retained checkpoints, as this process sees it (the same path as the
    cluster's processes: a shared volume); ``None`` asks the jobmanager
    (``checkpoints_from_jobmanager``).
    """

    def __init__(self, url: str, home: Path, env: Path, checkpoint_dir: Path | None = None) -> None:
        self.host, self.rest_port = parse_jobmanager_url(url)
        self.home = home.resolve()
        self.env = env.resolve()
        self.flink_home = flinkenv.flink_home(self.env)
        self._checkpoint_dir = checkpoint_dir

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.rest_port}"

    @property
    def conf_dir(self) -> Path:
        return self.home / "conf" / "client"

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def checkpoint_dir(self) -> Path:
        if self._checkpoint_dir is None:
            raise FlinkError("the checkpoints folder is not known yet")
        return self._checkpoint_dir

    def _environment(self) -> dict[str, str]:
        return flink_environment(self.env, self.conf_dir, self.log_dir, self.home)

    def prepare_client(self) -> None:
        """Writes the client's conf (where the jobmanager is; the JVM options)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        conf = {
            "rest.address": self.host,
            "rest.port": self.rest_port,
            "jobmanager.rpc.address": self.host,
            "env.java.opts.all": _java_opts(self.flink_home),
        }
        write_conf(self.conf_dir, self.flink_home, conf)

    def wait_until_up(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Waits until the REST API answers and a taskmanager has registered."""
        self._wait(lambda: bool(self._registered()), "the jobmanager and a taskmanager", timeout_s)

    def checkpoints_from_jobmanager(self) -> Path:
        """The jobmanager's checkpoints folder (``execution.checkpointing.dir``,
        a file:// URI), which must be visible here at the same path."""
        entries = self._rest("/jobmanager/config")
        if not isinstance(entries, list):
            raise FlinkError(f"{self.url}/jobmanager/config did not answer")
        values = {str(e.get("key")): str(e.get("value")) for e in entries if isinstance(e, dict)}
        uri = values.get("execution.checkpointing.dir", "")
        parts = urllib.parse.urlsplit(uri)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise FlinkError(
                f"the jobmanager's execution.checkpointing.dir is {uri!r}: a file:// "
                "folder on a volume shared with this process is needed"
            )
        path = Path(urllib.parse.unquote(parts.path))
        if not path.is_dir():
            raise FlinkError(
                f"the jobmanager's checkpoints folder {path} is not visible here: "
                "mount the same volume at the same path"
            )
        self._checkpoint_dir = path
        return path

    def jobs_named(self, name: str) -> list[tuple[str, str]]:
        """(id, state) of the cluster's jobs called ``name``."""
        overview = self._rest("/jobs/overview") or {}
        return [
            (job["jid"], str(job["state"]))
            for job in overview.get("jobs", [])
            # the REST API's answer is data: a job id goes into URLs only
            # when it is one (32 hex digits)
            if job.get("name") == name
            and isinstance(job.get("jid"), str)
            and JOB_ID.fullmatch(job["jid"])
        ]

    def submit(self, job: Path, job_spec: Path, from_checkpoint: str | None = None) -> str:
        """Submits the PyFlink program ``job`` (detached) with ``job_spec`` as
        its argument, from a retained checkpoint if given; returns the job id."""
        python = str(flinkenv.python_of(self.env))
        host = f"[{self.host}]" if ":" in self.host else self.host
        command = [
            "bash",
            str(self.flink_home / "bin" / "flink"),
            "run",
            "--detached",
            "-m",
            f"{host}:{self.rest_port}",
            *(["--fromSavepoint", from_checkpoint] if from_checkpoint else []),
            "-pyexec",
            python,
            "-pyclientexec",
            python,
            "-py",
            str(job),
            str(job_spec),
        ]
        self.log_dir.mkdir(parents=True, exist_ok=True)
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
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a Flink job id: {job_id[:40]!r}")
        request = urllib.request.Request(f"{self.url}/jobs/{job_id}?mode=cancel", method="PATCH")
        with urllib.request.urlopen(request, timeout=10):
            pass
        self._wait(lambda: self.job_state(job_id) == "CANCELED", f"job {job_id} to cancel")

    def wait_for(self, ready: Any, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        self._wait(ready, what, timeout_s)

    def taskmanagers(self) -> int:
        """How many taskmanagers are registered."""
        return len(self._registered())

    # ---- REST ---------------------------------------------------------------------

    def _registered(self) -> set[str]:
        """The ids of the taskmanagers registered with the jobmanager."""
        overview = self._rest("/taskmanagers")
        return {tm["id"] for tm in overview["taskmanagers"]} if overview else set()

    def _rest(self, path: str) -> Any:
        """The REST API's JSON answer, or None if it is not up (or 404)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                body = response.read(MAX_REST_BYTES + 1)
            if len(body) > MAX_REST_BYTES:
                raise ValueError(f"{path[:80]}: answer over {MAX_REST_BYTES} bytes")
            return json.loads(body)
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None

    def _check_processes(self) -> None:
        """Raises FlinkError if a process this object runs has died (none here)."""

    def _wait(self, ready: Any, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_processes()
            if ready():
                return
            time.sleep(0.2)
        raise FlinkError(
            f"timed out after {timeout_s:.0f} s waiting for {what} at {self.url}; "
            f"see {self.log_dir}"
        )


# ---- a local cluster (the runner's, the tests') ------------------------------------


class FlinkCluster(FlinkRest):
    """A jobmanager and taskmanagers this process starts and stops, on
    loopback, all under ``home``."""

    def __init__(self, home: Path, env: Path, rest_port: int) -> None:
        super().__init__(
            f"http://127.0.0.1:{check_port(rest_port)}", home, env, home.resolve() / "checkpoints"
        )
        self.rpc_port = rest_port + 1
        self._jobmanager: subprocess.Popen[bytes] | None = None
        self._taskmanagers: list[subprocess.Popen[bytes]] = []
        self._started_taskmanagers = 0

    # ---- processes ----------------------------------------------------------------

    @property
    def conf_dir(self) -> Path:
        return self.home / "conf"

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

    def _write_conf(self) -> None:
        for folder in (self.conf_dir, self.log_dir, self.checkpoint_dir, self.home / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        conf = cluster_conf(
            self.flink_home, self.home, rest_port=self.rest_port, rpc_port=self.rpc_port
        )
        write_conf(self.conf_dir, self.flink_home, conf)

    def _check_processes(self) -> None:
        if self._jobmanager is not None and self._jobmanager.poll() is not None:
            raise FlinkError(f"the jobmanager exited; see {self.log_dir}")


def _java_opts(flink_home: Path) -> str:
    """The distribution's JVM options (the module opens Flink needs on Java
    17), from its own config.yaml."""
    default = yaml.safe_load((flink_home / "conf" / "config.yaml").read_text())
    return str(default["env"]["java"]["opts"]["all"])


# ---- one process of a cluster, in the foreground (a container's command) -----------


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mlmesh_features.streaming.cluster",
        description="Runs a Flink jobmanager or taskmanager in the foreground.",
    )
    roles = parser.add_subparsers(dest="role", required=True)
    check = roles.add_parser("check", help="exit 0 when the cluster is up (a health check)")
    check.add_argument("--jobmanager", default="http://127.0.0.1:18081", help="its REST URL")
    check.add_argument("--taskmanagers", type=int, default=1, help="at least this many")
    for role in ("jobmanager", "taskmanager"):
        sub = roles.add_parser(role)
        sub.add_argument("--home", type=Path, required=True, help="conf/, log/, tmp/ go here")
        sub.add_argument("--env", type=Path, default=flinkenv.DEFAULT_ENV, help="the Flink env")
        sub.add_argument("--rest-port", type=int, default=18081)
        sub.add_argument("--rpc-port", type=int, default=18082, help="the jobmanager's RPC")
        sub.add_argument("--host", default="127.0.0.1", help="the address others reach it by")
        sub.add_argument("--bind-host", default="127.0.0.1", help="0.0.0.0 on a bridge network")
        sub.add_argument("--checkpoints", type=Path, default=None, help="<home>/checkpoints")
        sub.add_argument("--tmp", type=Path, default=None, help="io.tmp.dirs: <home>/tmp")
        if role == "jobmanager":
            sub.add_argument("--blob-port", type=int, default=0, help="0: the kernel's")
            sub.add_argument("--memory", default=JOBMANAGER_MEMORY)
        else:
            sub.add_argument("--jobmanager", required=True, help="the jobmanager's host")
            sub.add_argument("--taskmanager-rpc-port", type=int, default=0)
            sub.add_argument("--data-port", type=int, default=0)
            sub.add_argument("--slots", type=int, default=TASK_SLOTS)
            sub.add_argument("--memory", default=TASKMANAGER_MEMORY)
    return parser.parse_args(argv)


def foreground_command(argv: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Writes the role's conf; returns the command and environment that run
    it in the foreground (``<role>.sh start-foreground``: the JVM)."""
    args = _arguments(argv)
    env = args.env.resolve()
    if not flinkenv.usable(env):
        raise FlinkError(f"no Flink distribution and Java in {env}")
    flink_home = flinkenv.flink_home(env)
    home = args.home.resolve()
    jobmanager = args.role == "jobmanager"
    conf = cluster_conf(
        flink_home,
        home,
        rest_port=args.rest_port,
        rpc_port=args.rpc_port,
        jobmanager_host=args.host if jobmanager else args.jobmanager,
        taskmanager_host="127.0.0.1" if jobmanager else args.host,
        bind_host=args.bind_host,
        blob_port=args.blob_port if jobmanager else 0,
        taskmanager_rpc_port=0 if jobmanager else args.taskmanager_rpc_port,
        taskmanager_data_port=0 if jobmanager else args.data_port,
        slots=TASK_SLOTS if jobmanager else args.slots,
        jobmanager_memory=args.memory if jobmanager else JOBMANAGER_MEMORY,
        taskmanager_memory=TASKMANAGER_MEMORY if jobmanager else args.memory,
        checkpoint_dir=args.checkpoints,
        tmp_dir=args.tmp,
    )
    conf_dir = home / "conf" / args.role
    log_dir = home / "log"
    checkpoints = (args.checkpoints or home / "checkpoints").resolve()
    for folder in (log_dir, Path(conf["io.tmp.dirs"]), *([checkpoints] if jobmanager else [])):
        folder.mkdir(parents=True, exist_ok=True)
    write_conf(conf_dir, flink_home, conf)
    command = ["bash", str(flink_home / "bin" / f"{args.role}.sh"), "start-foreground"]
    # The pid file (flink-console.sh keeps one per role) next to the role's conf.
    return command, flink_environment(env, conf_dir, log_dir, conf_dir)


def check_up(url: str, taskmanagers: int) -> bool:
    """Whether the jobmanager at ``url`` answers with at least
    ``taskmanagers`` taskmanagers registered."""
    rest = FlinkRest(url, Path("/nonexistent"), Path("/nonexistent"))
    if taskmanagers <= 0:
        return rest._rest("/overview") is not None
    return rest.taskmanagers() >= taskmanagers


def main(argv: list[str] | None = None) -> None:
    try:
        args = _arguments(argv)
        if args.role == "check":
            raise SystemExit(0 if check_up(args.jobmanager, min(args.taskmanagers, 1000)) else 1)
        command, environ = foreground_command(argv)
    except (FlinkError, ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    # The JVM replaces this process: signals (SIGTERM) reach it directly.
    os.execve(shutil.which("bash") or "/bin/bash", command, environ)


if __name__ == "__main__":
    main()

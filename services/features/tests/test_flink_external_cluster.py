"""The streaming path on a Flink cluster run as separate processes, as the
containers run it: ``python -m mlmesh_features.streaming.cluster jobmanager``
and ``... taskmanager`` (each its own home; only the checkpoints folder and
the features root are shared), then the supervisor in external mode
(``--jobmanager http://HOST:PORT``, ``--demo``).

It checks the job runs, a streamed value reaches the online store (the
loader over the job's committed output), SIGTERM to the supervisor cancels
the job (its checkpoint retained) and leaves the cluster up, and a second
supervisor resumes from that checkpoint. scripts/setup.sh provisions the
Flink environment: missing, the test fails under CI and skips elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlmesh_features.definitions import parse
from mlmesh_features.store import FeastThread, FeatureStore
from mlmesh_features.streaming import cluster as flink_cluster
from mlmesh_features.streaming import flinkenv
from mlmesh_features.streaming.cluster import JOB_NAME, FlinkError, FlinkRest
from mlmesh_features.streaming.loader import StreamLoader, committed_files, output_directory
from mlmesh_features.streaming.supervisor import free_port_pair, latest_retained_checkpoint

ENV = flinkenv.DEFAULT_ENV
STARTUP_TIMEOUT_S = 90.0

DEFINITIONS = """\
entities:
  - {name: user, join_key: user_id, value_type: int64}
sources:
  - name: clicks
    kind: stream
    timestamp_field: event_time
    columns: {user_id: int64, amount: double}
feature_views:
  - name: clicks_live
    entities: [user]
    source: clicks
    step: 1s
    aggregations:
      - {name: clicks_2s, function: count, window: 2s}
      - {name: spend_2s, function: sum, column: amount, window: 2s}
"""


def _module(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", *(str(a) for a in args)]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return 0


def _wait(ready, what: str, timeout_s: float, logs: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            tails = "\n".join(
                f"== {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                for p in sorted(logs.glob("*.out"))
            )
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.3)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FlinkRest, Path, Path]]:
    """A jobmanager and a taskmanager, separate processes with homes of their
    own; yields the client, the shared checkpoints folder and the logs."""
    if not flinkenv.provisioned(ENV):
        message = (
            f"the Flink environment {ENV} is not provisioned: run scripts/setup.sh "
            "(python -m mlmesh_features.streaming.flinkenv)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    logs = tmp_path / "logs"
    logs.mkdir()
    checkpoints = tmp_path / "shared" / "checkpoints"
    port = free_port_pair()
    common = ["--env", ENV, "--rest-port", str(port), "--rpc-port", str(port + 1)]
    processes = []
    try:
        for role, extra in (
            ("jobmanager", ["--checkpoints", checkpoints]),
            ("taskmanager", ["--jobmanager", "127.0.0.1"]),
        ):
            with open(logs / f"{role}.out", "ab") as out:
                processes.append(
                    subprocess.Popen(
                        _module(
                            "mlmesh_features.streaming.cluster",
                            role,
                            "--home",
                            tmp_path / role,
                            *common,
                            *extra,
                        ),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        client = FlinkRest(f"http://127.0.0.1:{port}", tmp_path / "client", ENV)
        started = time.monotonic()
        try:
            client.wait_until_up(STARTUP_TIMEOUT_S)
        except FlinkError as error:
            tail = (logs / "jobmanager.out").read_text()[-3000:]
            raise AssertionError(f"{error}\n{tail}") from error
        print(f"jobmanager and taskmanager up in {time.monotonic() - started:.1f} s")
        yield client, checkpoints, logs
        for process in processes:
            assert process.poll() is None, f"{process.args[4]} exited ({process.returncode})"
    finally:
        for process in reversed(processes):
            _stop(process)


async def _apply(root: Path) -> tuple[FeatureStore, FeastThread]:
    feast = FeastThread()
    store = FeatureStore(root)
    await feast.run(
        lambda: store.apply(DEFINITIONS, parse(DEFINITIONS), prune=False, validate_only=False)
    )
    return store, feast


def _supervisor(root: Path, home: Path, url: str, ready: int, logs: Path, name: str):
    with open(logs / f"{name}.out", "ab") as out:
        return subprocess.Popen(
            _module(
                "mlmesh_features.streaming.supervisor",
                "--root",
                root,
                "--home",
                home,
                "--env",
                ENV,
                "--demo",
                "--jobmanager",
                url,
                "--ready-port",
                str(ready),
                "--wait",
                "60",
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _check(url: str, taskmanagers: int) -> int:
    """The exit status of the containers' health check command."""
    command = _module("mlmesh_features.streaming.cluster", "check", "--jobmanager", url)
    done = subprocess.run([*command, "--taskmanagers", str(taskmanagers)], timeout=60)
    return done.returncode


def _running(client: FlinkRest) -> list[str]:
    return [job for job, state in client.jobs_named(JOB_NAME) if state == "RUNNING"]


def _settled(client: FlinkRest) -> bool:
    """One job of the name RUNNING in the overview, all its tasks running."""
    running = _running(client)
    return len(running) == 1 and client.job_running(running[0])


@pytest.mark.timeout(240)
async def test_the_supervisor_runs_the_job_on_an_external_cluster_and_leaves_it_up(
    cluster: tuple[FlinkRest, Path, Path], tmp_path: Path
) -> None:
    client, checkpoints, logs = cluster
    assert _check(client.url, 1) == 0
    assert _check(client.url, 2) == 1  # one taskmanager only
    root = tmp_path / "features"
    store, feast = await _apply(root)
    home = tmp_path / "supervisor"
    ready = free_port_pair()
    readiness = f"http://127.0.0.1:{ready}/"
    started = time.monotonic()
    supervisor = _supervisor(root, home, client.url, ready, logs, "supervisor-1")
    try:
        _wait(lambda: _get(readiness) == 200, "the job to run", 120, logs)
        print(f"job running {time.monotonic() - started:.1f} s after the supervisor started")
        # The jobs' overview can lag the job's own page, which readiness
        # reads, and a job restarted by Flink early on is running again
        # within seconds: wait for both to agree.
        _wait(lambda: _settled(client), "the job running in the overview", 60, logs)
        [job_id] = _running(client)

        # Demo events -> the job -> committed output -> the online store.
        output = output_directory(root, "clicks_live")
        _wait(lambda: bool(list(committed_files(output))), "committed output", 60, logs)
        assert await StreamLoader(store, feast).poll() > 0
        rows = await feast.run(
            store.read, "clicks_live", ["clicks_2s"], [{"user_id": u} for u in range(1, 21)]
        )
        counts = [row[0].value for row in rows if row[0].value is not None]
        assert counts and all(isinstance(c, int) and c > 0 for c in counts), rows
        _wait(lambda: client.completed_checkpoints(job_id) > 0, "a checkpoint", 30, logs)

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        # The job is cancelled, its checkpoint retained; the cluster stays up.
        assert client.job_state(job_id) == "CANCELED"
        assert client.taskmanagers() == 1
        assert _check(client.url, 1) == 0
        retained = latest_retained_checkpoint(checkpoints)
        assert retained is not None and retained.parent.name == job_id

        # A second supervisor resumes from it on the same cluster.
        supervisor = _supervisor(root, home, client.url, ready, logs, "supervisor-2")
        _wait(lambda: _get(readiness) == 200, "the resumed job to run", 120, logs)
        print(f"resumed {time.monotonic() - started:.1f} s after the first supervisor started")
        _wait(lambda: _settled(client), "the resumed job running in the overview", 60, logs)
        [resumed] = _running(client)
        assert resumed != job_id
        assert client.restored_from(resumed) == f"file:{retained}"
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        assert client.job_state(resumed) == "CANCELED"
        assert client.taskmanagers() == 1
    finally:
        _stop(supervisor)
        await feast.close()


# ---- the commands' arguments (no cluster) -----------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:18081",
        "http://127.0.0.1",
        "http://127.0.0.1:18081/jobs",
        "http://user:secret@127.0.0.1:18081",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:18081?x=1",
        "http://bad;host:18081",
        "http://-flag:18081",
        "file:///etc/passwd",
        "",
    ],
)
def test_a_hostile_jobmanager_url_is_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FlinkRest(url, tmp_path, ENV)


@pytest.mark.parametrize(
    "argv",
    [
        ["jobmanager", "--host", "a b"],
        ["jobmanager", "--bind-host", "0.0.0.0;id"],
        ["jobmanager", "--rest-port", "0"],
        ["jobmanager", "--memory", "1t"],
        ["taskmanager", "--jobmanager=-Dx=y"],
        ["taskmanager", "--jobmanager", "127.0.0.1", "--data-port", "70000"],
    ],
)
def test_hostile_process_arguments_are_refused(argv: list[str], tmp_path: Path) -> None:
    if not flinkenv.usable(ENV):
        pytest.skip(f"no Flink environment in {ENV}")
    role, *rest = argv
    with pytest.raises(ValueError):
        flink_cluster.foreground_command([role, "--home", str(tmp_path), "--env", str(ENV), *rest])
    assert not (tmp_path / "conf").exists()


def test_each_role_gets_its_own_conf_naming_the_shared_checkpoints(tmp_path: Path) -> None:
    if not flinkenv.usable(ENV):
        pytest.skip(f"no Flink environment in {ENV}")
    shared = tmp_path / "shared" / "checkpoints"
    common = ["--env", str(ENV), "--rest-port", "18081", "--rpc-port", "18082"]
    jobmanager = ["jobmanager", "--home", str(tmp_path / "jm"), "--checkpoints", str(shared)]
    network = ["--host", "flink-jobmanager", "--bind-host", "0.0.0.0", "--blob-port", "18083"]
    command, environ = flink_cluster.foreground_command([*jobmanager, *common, *network])
    script = flinkenv.flink_home(ENV) / "bin" / "jobmanager.sh"
    assert command[1:] == [str(script), "start-foreground"]
    conf_dir = Path(environ["FLINK_CONF_DIR"])
    assert conf_dir == (tmp_path / "jm" / "conf" / "jobmanager").resolve()
    conf = yaml.safe_load((conf_dir / "config.yaml").read_text())
    assert conf["rest.port"] == 18081 and conf["jobmanager.rpc.port"] == 18082
    assert conf["blob.server.port"] == "18083"
    assert conf["rest.address"] == conf["jobmanager.rpc.address"] == "flink-jobmanager"
    assert conf["rest.bind-address"] == conf["jobmanager.bind-host"] == "0.0.0.0"
    assert conf["execution.checkpointing.dir"] == shared.resolve().as_uri()
    assert shared.is_dir()
    assert "PYTHONPATH" not in environ and environ["JAVA_HOME"].startswith(str(ENV.resolve()))

    taskmanager = ["taskmanager", "--home", str(tmp_path / "tm"), "--jobmanager", "flink-jm"]
    network = ["--host", "flink-tm", "--taskmanager-rpc-port", "18084", "--data-port", "18085"]
    command, environ = flink_cluster.foreground_command([*taskmanager, *common, *network])
    assert command[1].endswith("taskmanager.sh")
    conf = yaml.safe_load((Path(environ["FLINK_CONF_DIR"]) / "config.yaml").read_text())
    assert conf["jobmanager.rpc.address"] == "flink-jm"
    assert conf["taskmanager.host"] == "flink-tm"
    assert conf["taskmanager.rpc.port"] == "18084" and conf["taskmanager.data.port"] == 18085
    assert conf["taskmanager.memory.process.size"] == flink_cluster.TASKMANAGER_MEMORY


class _Answer:
    """A REST answer of ``body`` (what urlopen returns, as a context manager)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self, limit: int = -1) -> bytes:
        return self.body if limit < 0 else self.body[:limit]


def test_the_rest_apis_answers_are_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Job ids go into URLs only when they are Flink job ids; an answer over
    the cap is not parsed."""
    good = "0123456789abcdef0123456789abcdef"
    jobs = (
        b'{"jobs": [{"jid": "%s", "state": "RUNNING", "name": "%s"},'
        b' {"jid": "../../jobmanager/config?x=", "state": "RUNNING", "name": "%s"},'
        b' {"jid": 7, "state": "RUNNING", "name": "%s"}]}'
        % (good.encode(), JOB_NAME.encode(), JOB_NAME.encode(), JOB_NAME.encode())
    )
    rest = FlinkRest("http://127.0.0.1:1", tmp_path, tmp_path)
    monkeypatch.setattr(flink_cluster.urllib.request, "urlopen", lambda *a, **k: _Answer(jobs))
    assert rest.jobs_named(JOB_NAME) == [(good, "RUNNING")]
    with pytest.raises(ValueError, match="not a Flink job id"):
        rest.cancel("../../x")
    huge = b"[" + b" " * flink_cluster.MAX_REST_BYTES + b"]"
    monkeypatch.setattr(flink_cluster.urllib.request, "urlopen", lambda *a, **k: _Answer(huge))
    assert rest.jobs_named(JOB_NAME) == []

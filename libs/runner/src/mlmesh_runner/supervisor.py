"""A small process supervisor for the local mesh.

Starts every catalog service (port 0, ports reported through a port file),
waits until each answers gRPC health SERVING, renders Envoy's config for the
ports it got, starts Envoy, waits until Envoy sees every cluster healthy, and
writes a ready file. A service that dies is restarted on the same port with
backoff. ``stop()`` stops Envoy first, then the services in reverse order:
SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlmesh_runner.catalog import (
    CATALOG,
    KEY_DIRECTORY_SERVICE,
    RunContext,
    ServiceSpec,
    service_env,
)
from mlmesh_runner.envoy import RUN_FLAGS, Upstream, healthy_clusters, render
from mlmesh_runner.keys import BootstrapKeys, ensure_bootstrap_keys, key_env, keyed

if TYPE_CHECKING:
    from mlmesh_runner.observe import Observer

log = logging.getLogger("mlmesh.runner")
# A Unix socket's path must fit in sockaddr_un (108 bytes on Linux).
UNIX_PATH_MAX = 100


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    port_file: Path | None = None
    process: asyncio.subprocess.Process | None = None
    ports: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    # The port it was told to bind (0: it picks one and says which).
    given_port: int = 0

    async def start(self) -> None:
        if self.port_file:
            self.port_file.unlink(missing_ok=True)
        handle = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdout=handle,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        handle.close()
        log.info("started %s (pid %s), log: %s", self.name, self.process.pid, self.log_path)

    async def wait_port_file(self, timeout_s: float) -> dict[str, Any]:
        assert self.port_file is not None and self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; "
                    f"see {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self.port_file.exists():
                self.ports = json.loads(self.port_file.read_text())
                return self.ports
            await asyncio.sleep(0.05)
        raise TimeoutError(
            f"{self.name} did not report its port in {timeout_s}s; see {self.log_path}"
        )

    async def wait_listening(self, timeout_s: float) -> dict[str, Any]:
        """For programs that cannot write a port file: the port it listens on."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; "
                    f"see {self.log_path}:\n{_tail(self.log_path)}"
                )
            ports = listening_ports(self.process.pid)
            if ports:
                self.ports = {"port": min(ports), "pid": self.process.pid}
                return self.ports
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} did not listen in {timeout_s}s; see {self.log_path}")

    async def stop(self, grace: float = 10.0) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            log.warning("%s did not stop in %ss; killing it", self.name, grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (from /proc; no bind-then-close race)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now (another process could take it before the child binds
    it: the child then fails to start and says so)."""
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def wait_ready(ready: Any, child: Child, timeout_s: float) -> None:
    """Polls ``ready(port)`` until it answers True."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.process and child.process.returncode is not None:
            raise RuntimeError(
                f"{child.name} exited; see {child.log_path}:\n{_tail(child.log_path)}"
            )
        if await ready(child.ports["port"]):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{child.name} not ready after {timeout_s}s; see {child.log_path}")


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


async def wait_healthy(
    port: int, service: str, timeout_s: float, child: Child | None = None
) -> None:
    """Polls grpc.health.v1 until ``service`` is SERVING."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child and child.process and child.process.returncode is not None:
                raise RuntimeError(
                    f"{child.name} exited; see {child.log_path}:\n{_tail(child.log_path)}"
                )
            with contextlib.suppress(grpc.RpcError):
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{service} on port {port} not SERVING after {timeout_s}s")


class Mesh:
    """Envoy plus every catalog service, supervised."""

    def __init__(
        self,
        state_dir: Path,
        *,
        listen_port: int = 8080,
        admin_port: int = 9901,
        listen_host: str = "127.0.0.1",
        envoy_concurrency: int = 1,
        otlp_endpoint: tuple[str, int] | None = None,
        catalog: list[ServiceSpec] | None = None,
        replicas: dict[str, int] | None = None,
        regions: dict[str, str] | None = None,
        observer: Observer | None = None,
    ) -> None:
        # How many processes of a service to run (default 1); Envoy balances them.
        self.replicas = dict(replicas or {})
        # The region of each instance ("llm.2": "east"; default "local"): the
        # gateway routes LLM requests region-first.
        self.regions = dict(regions or {})
        self.state = state_dir.resolve()
        self.listen_port = listen_port
        self.admin_port = admin_port
        self.listen_host = listen_host
        self.envoy_concurrency = envoy_concurrency
        self.otlp_endpoint = otlp_endpoint
        self.catalog = catalog if catalog is not None else CATALOG
        self.children: dict[str, Child] = {}
        self.envoy: Child | None = None
        self.address = ""
        self.admin_address = ""
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        self.keys: BootstrapKeys | None = None
        # --observe: Phoenix (traces) and Prometheus (metrics) beside the mesh.
        self.observer = observer
        if observer is not None and otlp_endpoint is None:
            self.otlp_endpoint = observer.otlp_endpoint

    async def start(self) -> dict[str, Any]:
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        (self.state / "run").mkdir(parents=True, exist_ok=True)
        (self.state / "run").chmod(0o700)  # the gateway's socket lives here
        self.keys = ensure_bootstrap_keys(self.state, keyed(self.catalog))
        # Slow starters others need only the address of: started on a port
        # picked here, waited for once the rest is up (before Envoy).
        background: list[asyncio.Task[None]] = []
        if self.observer is not None:  # its ports are known: the services start meanwhile
            background.append(asyncio.create_task(self.observer.start()))
        try:
            for spec in self.catalog:
                if spec.prepare is not None:
                    await self._prepare(spec)
                for instance in self.instances(spec):
                    if spec.start_in_background:
                        child = self._child(spec, port=free_port(), instance=instance)
                        self.children[instance] = child
                        background.append(asyncio.create_task(self._bring_up(spec, child)))
                        continue
                    child = self._child(spec, instance=instance)
                    self.children[instance] = child
                    await self._bring_up(spec, child)
                    log.info("%s is SERVING on port %s", instance, child.ports["port"])
            await asyncio.gather(*background)
        finally:
            for task in background:
                task.cancel()
        await self._start_envoy()
        await self._wait_keys_current()
        for spec in self.catalog:
            for instance in self.instances(spec):
                self._watchers.append(asyncio.create_task(self._watch(spec, instance)))
        self._write_targets()
        ready = self.describe()
        self._write_ready(ready)
        return ready

    def _write_targets(self) -> None:
        """Prometheus' targets: every instance's metrics port, Envoy's admin."""
        if self.observer is None:
            return
        from mlmesh_runner.observe import Target

        targets = [
            Target(name.split(".", 1)[0], name, f"127.0.0.1:{child.ports['metrics_port']}")
            for name, child in self.children.items()
            if child.ports.get("metrics_port")
        ]
        if self.admin_address:
            targets.append(Target("envoy", "envoy", self.admin_address))
        self.observer.write_targets(targets)

    def _write_ready(self, ready: dict[str, Any]) -> None:
        """The ready file: addresses, ports, logs; never a secret (the admin
        key's file is named, mode 0600)."""
        (self.state / "ready.json").write_text(json.dumps(ready, indent=2))

    def describe(self) -> dict[str, Any]:
        context = self.context()
        return {
            "address": self.address,
            "admin": self.admin_address,
            "services": {
                name: {
                    **child.ports,
                    "log": str(child.log_path),
                    "region": context.region(name),
                }
                for name, child in self.children.items()
            },
            "envoy_log": str(self.state / "logs" / "envoy.log"),
            "admin_key_file": str(self.keys.admin_file) if self.keys else "",
            **(self.observer.describe() if self.observer is not None else {}),
        }

    def admin_key(self) -> str:
        """The bootstrap admin key (mode 0600 in the state directory)."""
        return self.keys.admin_file.read_text().strip() if self.keys else ""

    def context(self) -> RunContext:
        return RunContext(
            self.state,
            {
                name: int(child.ports["port"])
                for name, child in self.children.items()
                if child.ports
            },
            self.regions,
        )

    async def _prepare(self, spec: ServiceSpec) -> None:
        assert spec.prepare is not None
        log_path = self.state / "logs" / f"{spec.name}.prepare.log"
        with log_path.open("ab") as handle:
            process = await asyncio.create_subprocess_exec(
                *spec.prepare(self.context()),
                stdout=handle,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                # Preparing (building and registering models) is the operator's
                # act: it runs with the admin key.
                env={**os.environ, "PYTHONUNBUFFERED": "1", "MLMESH_API_KEY": self.admin_key()},
            )
            code = await process.wait()
        if code != 0:
            raise RuntimeError(
                f"preparing {spec.name} failed ({code}); see {log_path}:\n{_tail(log_path)}"
            )
        log.info("prepared %s", spec.name)

    def instances(self, spec: ServiceSpec) -> list[str]:
        """Instance names: the service's name, then name.1, name.2, ..."""
        count = max(1, self.replicas.get(spec.name, 1))
        return [spec.name, *(f"{spec.name}.{i}" for i in range(1, count))]

    def _child(
        self, spec: ServiceSpec, port: int = 0, instance: str = "", http_port: int = 0
    ) -> Child:
        instance = instance or spec.name
        port_file = self.state / "run" / f"{instance}.port.json"
        defaults, fixed = service_env(
            spec,
            self.context(),
            instance=instance,
            port=port,
            port_file=port_file,
            http_port=http_port,
            key_env=self._key_env(spec),
        )
        env = {
            **defaults,
            # --observe: spans to Phoenix (the caller's environment may say otherwise).
            **(self.observer.service_env(spec.env_prefix) if self.observer else {}),
            **os.environ,
            **fixed,
        }
        argv = list(spec.command(self.context(), port))
        log_path = self.state / "logs" / f"{instance}.log"
        discovered = spec.port_discovery == "port-file"
        child = Child(instance, argv, env, log_path, port_file if discovered else None)
        child.given_port = port
        if spec.start_in_background:  # its address is known before it listens
            child.ports = {"port": port}
        return child

    async def _wait_keys_current(self, timeout_s: float = 30.0) -> None:
        """Waits until every service follows the key directory (they serve
        from their bootstrap keys before), so keys made now work everywhere."""
        if KEY_DIRECTORY_SERVICE not in self.children:
            return
        for spec in self.catalog:
            if self.keys is None or spec.name not in self.keys.service_files:
                continue
            if spec.name == KEY_DIRECTORY_SERVICE:
                continue
            for instance in self.instances(spec):
                child = self.children[instance]
                await wait_healthy(child.ports["port"], "mlmesh.keys", timeout_s, child)

    def _key_env(self, spec: ServiceSpec) -> dict[str, str]:
        """A chassis service's key settings (keys.key_env): the key directory
        is its service's Unix socket in the private run folder, or its port
        file when the socket's path is too long."""
        if self.keys is None or spec.name not in self.keys.service_files:
            return {}
        socket = self.state / "run" / f"{KEY_DIRECTORY_SERVICE}.sock"
        on_socket = len(str(socket)) < UNIX_PATH_MAX
        if on_socket:
            where = {"TARGET": f"unix:{socket}"}
        else:
            where = {"TARGET_FILE": str(self.state / "run" / f"{KEY_DIRECTORY_SERVICE}.port.json")}
        return key_env(
            spec,
            self.keys.directory_file.parent,
            KEY_DIRECTORY_SERVICE,
            where,
            local_socket=socket if on_socket else None,
        )

    async def _bring_up(self, spec: ServiceSpec, child: Child) -> None:
        """Starts ``child``, learns its port, waits until it is ready."""
        await child.start()
        if spec.start_in_background:
            assert child.given_port and child.process is not None
            child.ports = {"port": child.given_port, "pid": child.process.pid}
        elif child.port_file is not None:
            await child.wait_port_file(spec.start_timeout)
        else:
            await child.wait_listening(spec.start_timeout)
        if spec.ready is not None:
            await wait_ready(spec.ready, child, spec.start_timeout)
        else:
            await wait_healthy(
                child.ports["port"], spec.services()[0].full_name, spec.start_timeout, child
            )

    async def _start_envoy(self) -> None:
        upstreams = [
            Upstream(
                spec.name,
                spec.services(),
                [("127.0.0.1", self.children[i].ports["port"]) for i in self.instances(spec)],
                ("127.0.0.1", self.children[spec.name].ports["port"])
                if spec.single_writer
                else None,
                http_prefixes=spec.http_routes,
                http_endpoints=[
                    ("127.0.0.1", int(self.children[i].ports["http_port"]))
                    for i in self.instances(spec)
                    if spec.http_routes
                ],
            )
            for spec in self.catalog
            if spec.routed
        ]
        config = render(
            upstreams,
            listen_host=self.listen_host,
            listen_port=self.listen_port,
            admin_port=self.admin_port,
            otlp_endpoint=self.otlp_endpoint,
        )
        config_path = self.state / "run" / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        admin_file = self.state / "run" / "envoy.admin"
        admin_file.unlink(missing_ok=True)
        envoy_bin = str(Path(sys.executable).with_name("envoy"))
        self.envoy = Child(
            "envoy",
            [
                envoy_bin,
                "-c",
                str(config_path),
                "--admin-address-path",
                str(admin_file),
                "--use-dynamic-base-id",
                "--concurrency",
                str(self.envoy_concurrency),
                *RUN_FLAGS,
            ],
            dict(os.environ),
            self.state / "logs" / "envoy.log",
        )
        await self.envoy.start()
        deadline = time.monotonic() + 30
        while not admin_file.exists() or not admin_file.read_text().strip():
            if self.envoy.process and self.envoy.process.returncode is not None:
                raise RuntimeError(f"envoy exited:\n{_tail(self.envoy.log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError("envoy did not start")
            await asyncio.sleep(0.05)
        self.admin_address = admin_file.read_text().strip()
        listeners = await asyncio.to_thread(self._admin_json, "/listeners?format=json")
        socket = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        self.address = f"{socket['address']}:{socket['port_value']}"
        await self._wait_clusters_healthy(deadline)
        log.info("envoy is routing on %s (admin http://%s)", self.address, self.admin_address)

    def _admin_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{self.admin_address}{path}", timeout=2) as reply:
            return json.loads(reply.read())

    async def _wait_clusters_healthy(self, deadline: float) -> None:
        names = {spec.name for spec in self.catalog if spec.routed}
        while True:
            clusters = await asyncio.to_thread(self._admin_json, "/clusters?format=json")
            healthy = healthy_clusters(clusters)
            if names <= healthy:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy clusters not healthy: {sorted(names - healthy)}")
            await asyncio.sleep(0.1)

    async def _watch(self, spec: ServiceSpec, instance: str) -> None:
        """Restarts a service that exits unexpectedly, on the same port."""
        backoff = 0.5
        while not self._stopping:
            child = self.children[instance]
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping:
                return
            log.warning("%s exited with %s; restarting in %.1fs", instance, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            replacement = self._child(
                spec,
                port=child.ports["port"],
                instance=instance,
                http_port=int(child.ports.get("http_port") or 0),
            )
            replacement.restarts = child.restarts + 1
            self.children[instance] = replacement
            try:
                await self._bring_up(spec, replacement)
                backoff = 0.5
                log.info("%s is back (restart %d)", instance, replacement.restarts)
                # The same port, a new pid (and metrics port): keep the ready
                # file and Prometheus' targets true.
                self._write_targets()
                self._write_ready(self.describe())
            except (RuntimeError, TimeoutError) as error:
                log.error("%s restart failed: %s", spec.name, error)

    async def stop(self) -> None:
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        if self.envoy:
            await self.envoy.stop(grace=5)
        for child in reversed(list(self.children.values())):
            await child.stop()
        if self.observer is not None:  # last: it receives the others' final spans
            await self.observer.stop()
        log.info("all stopped")

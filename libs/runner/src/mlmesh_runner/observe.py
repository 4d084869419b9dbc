"""`mlmesh-run --observe`: a trace store and Prometheus beside the mesh.

Both run on loopback, their data under ``<state>/observe``:

- **Arize Phoenix** (``.envs/phoenix``, provisioned by scripts/setup-observe.sh):
  an OTLP gRPC receiver every service and Envoy export spans to, and a UI
  with a REST API (``/v1/projects/default/spans``) and GraphQL, on SQLite.
- **Prometheus** (Debian's package): scrapes every service instance's
  metrics port and Envoy's ``/stats/prometheus``. The targets are file_sd
  files the runner rewrites when an instance (re)starts (a restarted
  instance keeps its gRPC port but gets a new metrics port). Rules and
  alerts: ``deploy/prometheus/rules/*.yml``.

Target labels: ``job`` is the service's name (``gateway``, ``llm``, ...) or
``envoy``; ``mlmesh_instance`` is the instance (``gateway``, ``gateway.1``).
The services' own metrics carry a ``service`` label (the gRPC service), so
the targets do not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlmesh_chassis.registration import http_ok

from mlmesh_runner import phoenixenv
from mlmesh_runner.supervisor import Child, free_port, wait_ready

log = logging.getLogger("mlmesh.runner")

ROOT = Path(__file__).resolve().parents[4]
RULES = ROOT / "deploy" / "prometheus" / "rules"
PHOENIX_SERVE = Path(__file__).with_name("phoenix_serve.py")
LOOPBACK = "127.0.0.1"


def phoenix_env() -> Path:
    """Where setup provisioned Phoenix (MLMESH_PHOENIX_HOME overrides)."""
    return Path(os.environ.get("MLMESH_PHOENIX_HOME", phoenixenv.DEFAULT_ENV))


def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise RuntimeError(
            "prometheus is not installed: run scripts/setup-observe.sh (Debian's package)"
        )
    return found


@dataclass(frozen=True)
class Target:
    """One scrape target: a service instance's metrics port, or Envoy's admin."""

    job: str
    instance: str
    address: str


class Observer:
    """Phoenix and Prometheus, started before the services, stopped after."""

    def __init__(
        self,
        state: Path,
        *,
        phoenix_port: int = 0,
        otlp_port: int = 0,
        prometheus_port: int = 0,
        scrape_interval: str = "2s",
        start_timeout: float = 300.0,
    ) -> None:
        self.dir = state.resolve() / "observe"
        self.phoenix_port = phoenix_port or free_port()
        self.otlp_port = otlp_port or free_port()
        self.prometheus_port = prometheus_port or free_port()
        self.scrape_interval = scrape_interval
        self.start_timeout = start_timeout
        self.phoenix: Child | None = None
        self.prometheus: Child | None = None

    # Addresses -----------------------------------------------------------

    @property
    def otlp_endpoint(self) -> tuple[str, int]:
        return LOOPBACK, self.otlp_port

    @property
    def otlp_url(self) -> str:
        return f"http://{LOOPBACK}:{self.otlp_port}"

    @property
    def phoenix_url(self) -> str:
        return f"http://{LOOPBACK}:{self.phoenix_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{LOOPBACK}:{self.prometheus_port}"

    def service_env(self, env_prefix: str) -> dict[str, str]:
        """A service's environment: export spans to Phoenix."""
        return {f"{env_prefix}OTEL_EXPORTER": self.otlp_url}

    def describe(self) -> dict[str, Any]:
        return {
            "phoenix": {
                "url": self.phoenix_url,
                "otlp_grpc": f"{LOOPBACK}:{self.otlp_port}",
                "project": "default",
                "log": str(self.dir / "phoenix.log"),
            },
            "prometheus": {
                "url": self.prometheus_url,
                "config": str(self.dir / "prometheus.yml"),
                "log": str(self.dir / "prometheus.log"),
            },
        }

    # Processes -----------------------------------------------------------

    async def start(self) -> None:
        """Starts both and waits until both answer."""
        (self.dir / "targets").mkdir(parents=True, exist_ok=True)
        (self.dir / "phoenix").mkdir(exist_ok=True)
        self.write_targets([])
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(self.prometheus_config()))
        self.prometheus = self._prometheus_child()
        self.phoenix = self._phoenix_child()
        await self.prometheus.start()
        await self.phoenix.start()
        self.prometheus.ports = {"port": self.prometheus_port}
        self.phoenix.ports = {"port": self.phoenix_port}
        await asyncio.gather(
            wait_ready(_ready("/-/ready"), self.prometheus, self.start_timeout),
            wait_ready(_ready("/healthz"), self.phoenix, self.start_timeout),
        )
        log.info("phoenix at %s (OTLP gRPC %s)", self.phoenix_url, self.otlp_url)
        log.info("prometheus at %s", self.prometheus_url)

    def _phoenix_child(self) -> Child:
        env = phoenix_env()
        if not phoenixenv.provisioned(env):
            raise RuntimeError(f"Phoenix is not provisioned at {env}: run scripts/setup-observe.sh")
        return Child(
            "phoenix",
            [str(env / "bin" / "python"), str(PHOENIX_SERVE)],
            {
                **os.environ,
                "PHOENIX_HOST": LOOPBACK,
                "PHOENIX_PORT": str(self.phoenix_port),
                "PHOENIX_GRPC_PORT": str(self.otlp_port),
                "MLMESH_PHOENIX_GRPC_HOST": LOOPBACK,
                "PHOENIX_WORKING_DIR": str(self.dir / "phoenix"),
                # Nothing fetched from the internet on its own initiative (web
                # fonts, telemetry, its sandbox's binary, its docs assistant).
                "PHOENIX_TELEMETRY_ENABLED": "false",
                "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
                "PHOENIX_DISABLE_AGENT_ASSISTANT": "true",
                "PHOENIX_LOG_MIGRATIONS": "false",
                "PHOENIX_LOGGING_LEVEL": "warning",
                "PYTHONUNBUFFERED": "1",
            },
            self.dir / "phoenix.log",
        )

    def _prometheus_child(self) -> Child:
        return Child(
            "prometheus",
            [
                prometheus_bin(),
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'prometheus-data'}",
                "--storage.tsdb.retention.time=2d",
                f"--web.listen-address={LOOPBACK}:{self.prometheus_port}",
                "--log.level=warn",
            ],
            dict(os.environ),
            self.dir / "prometheus.log",
        )

    async def stop(self) -> None:
        for child in (self.prometheus, self.phoenix):
            if child is not None:
                await child.stop(grace=10)

    # Prometheus' configuration -------------------------------------------

    def prometheus_config(self) -> dict[str, Any]:
        targets = self.dir / "targets"
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": "1s",
                "evaluation_interval": self.scrape_interval,
            },
            "rule_files": [str(RULES / "*.yml")],
            "scrape_configs": [
                {
                    "job_name": "mlmesh",
                    "file_sd_configs": [
                        {"files": [str(targets / "services.json")], "refresh_interval": "5s"}
                    ],
                },
                {
                    "job_name": "envoy",
                    "metrics_path": "/stats/prometheus",
                    "file_sd_configs": [
                        {"files": [str(targets / "envoy.json")], "refresh_interval": "5s"}
                    ],
                },
                {
                    "job_name": "prometheus",
                    "static_configs": [{"targets": [f"{LOOPBACK}:{self.prometheus_port}"]}],
                },
            ],
        }

    def write_targets(self, targets: list[Target]) -> None:
        """Rewrites the file_sd files (atomically: Prometheus watches them)."""
        by_file: dict[str, list[dict[str, Any]]] = {"services.json": [], "envoy.json": []}
        for target in targets:
            name = "envoy.json" if target.job == "envoy" else "services.json"
            by_file[name].append(
                {
                    "targets": [target.address],
                    "labels": {"job": target.job, "mlmesh_instance": target.instance},
                }
            )
        for name, groups in by_file.items():
            path = self.dir / "targets" / name
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(groups, indent=2))
            tmp.replace(path)


def _ready(path: str) -> Any:
    async def ready(port: int) -> bool:
        return await http_ok(port, path)

    return ready

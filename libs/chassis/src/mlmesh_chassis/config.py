"""Typed settings from the environment and an optional TOML file.

Each service subclasses ``ServiceSettings`` with its own prefix, e.g.
``MLMESH_REGISTRY_``. Precedence: init arguments > environment > the TOML file
named by ``<PREFIX>CONFIG_FILE`` > defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ServiceSettings(BaseSettings):
    """Settings every service has. Subclass and set ``model_config``'s env_prefix."""

    model_config = SettingsConfigDict(env_prefix="MLMESH_", extra="ignore")
    # The gRPC service names this server exposes (filled in by the service).
    service_name: ClassVar[str] = "mlmesh"

    host: str = "127.0.0.1"
    # 0 picks a free port; the bound port is logged and written to port_file.
    port: int = 0
    # Prometheus endpoint: -1 disables it, 0 picks a free port.
    metrics_port: int = 0
    # When set, the bound ports are written here as JSON once the server serves.
    port_file: Path | None = None
    log_level: str = "INFO"
    # The event loop: asyncio's own, or uvloop (libuv; grpc.aio runs on it
    # too). On this 2-core machine the gateway's CPU per call was the same
    # within noise either way.
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    # Seconds between NOT_SERVING and server.stop(), so Envoy drains first.
    drain_seconds: float = 0.5
    # Seconds in-flight calls get to finish on shutdown.
    grace_seconds: float = 5.0
    # OpenTelemetry: "" (spans kept in-process only), "console", or an OTLP
    # gRPC endpoint such as http://127.0.0.1:4317.
    otel_exporter: str = ""
    # Callers' keys (mlmesh_chassis.auth): the gateway's KeyDirectoryService,
    # as host:port or as the path of its port file (read at each reconnect).
    keys_target: str = ""
    keys_target_file: Path | None = None
    # This service's own key (a file holding the secret; replace it to rotate).
    service_key_file: Path | None = None
    # Bootstrap keys (WatchKeysResponse JSON: the operator's service and admin
    # keys), trusted until the first snapshot from the key directory.
    bootstrap_keys_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        prefix = str(settings_cls.model_config.get("env_prefix", ""))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(f"{prefix}CONFIG_FILE")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"{prefix}CONFIG_FILE={config_file} does not exist")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    def public_dict(self) -> dict[str, Any]:
        """Settings safe to log (URLs with passwords are masked)."""
        values = self.model_dump(mode="json")
        for key, value in values.items():
            if isinstance(value, str) and "://" in value and "@" in value:
                scheme, rest = value.split("://", 1)
                values[key] = f"{scheme}://***@{rest.split('@', 1)[1]}"
        return values

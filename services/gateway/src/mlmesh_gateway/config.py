"""Gateway settings (environment prefix MLMESH_GATEWAY_)."""

from __future__ import annotations

from typing import ClassVar

from mlmesh_chassis.config import ServiceSettings
from pydantic_settings import SettingsConfigDict


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_GATEWAY_", extra="ignore")
    service_name: ClassVar[str] = "gateway"

    # Keys, usage: SQLite by default, PostgreSQL by setting.
    database_url: str = "sqlite+aiosqlite:///.mlmesh/gateway.db"
    # How often this replica reads key changes other replicas made.
    key_poll_seconds: float = 0.25

    # Token throttling: in-process by default; a Redis URL when several
    # gateway replicas share limits (redis://host:6379/0). With Redis down,
    # each replica enforces the limits divided by `replicas`.
    redis_url: str = ""
    replicas: int = 1
    # A Redis decision slower than this counts as Redis being down.
    redis_timeout_seconds: float = 0.5
    # LLM endpoints: "region=host:port,region=host:port"; this gateway's region.
    llm_endpoints: str = ""
    region: str = ""
    # Requests in flight or waiting at which an endpoint counts as saturated.
    saturation: int = 32
    # The registry: aliases and A/B experiments (empty: requests without a
    # version go to the version Triton serves by default).
    registry_target: str = ""
    # Triton (KServe v2 gRPC) for Infer and Embed.
    triton_target: str = ""
    # What ListModels offers (the registry names).
    llm_models: str = "tiny-llama"
    classic_models: str = "digits"
    embedding_models: str = "minilm"


def names(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]

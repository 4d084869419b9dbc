"""Gateway settings (environment prefix MLMESH_GATEWAY_)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from mlmesh_metering import MeteringSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class GatewaySettings(MeteringSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_GATEWAY_", extra="ignore")
    service_name: ClassVar[str] = "gateway"

    # Keys, usage: SQLite by default, PostgreSQL by setting.
    database_url: str = "sqlite+aiosqlite:///.mlmesh/gateway.db"
    # How often this replica reads key changes other replicas made.
    key_poll_seconds: float = 0.25
    # Also serve on this Unix socket (for services on the same host to follow
    # the key directory and send usage: only processes that may open the
    # socket's folder can reach it, so none can pose as the key directory by
    # taking over a TCP port). Unset: TCP only.
    local_socket: Path | None = None

    # Token throttling (redis_url, replicas, redis_timeout_seconds): see
    # mlmesh_metering.MeteringSettings. The gateway writes the ledger itself
    # (usage_target is for other services).
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

    # The OpenAI-compatible HTTP surface (/v1/chat/completions, /v1/completions,
    # /v1/embeddings, /v1/models): served on this port when set (0: any free
    # port), which is then written to http_port_file. Unset: gRPC only.
    http_port: int | None = None
    http_port_file: Path | None = None
    # Models backed by OpenAI-compatible servers (a vllm serve fleet, a hosted
    # provider): JSON, see mlmesh_gateway.upstreams.
    openai_upstreams: str = ""
    # Where the served versions' tokenizers are downloaded (prompt tokens are
    # counted in the gateway).
    tokenizer_cache_dir: Path = Path(".mlmesh/gateway-tokenizers")

    # Prediction logging to the monitor (mlmesh_gateway.prediction_log):
    # its address (empty: off); the share of calls logged, and per model
    # ("digits=1.0,tiny-llama=0.1"); the queue's bound (a full queue drops
    # and counts); batches of at most this many, sent at least this often;
    # how long one send may take before its batch is dropped.
    monitor_target: str = ""
    prediction_sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    prediction_sample_rates: str = ""
    prediction_queue_size: int = Field(default=10_000, ge=1, le=1_000_000)
    prediction_batch_size: int = Field(default=200, ge=1, le=500)
    prediction_flush_seconds: float = Field(default=1.0, gt=0, le=60)
    prediction_send_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    # The review queue (mlmesh_gateway.shadows): shadow disagreements are
    # submitted there, off the callers' path (empty: not submitted).
    review_target: str = ""


def names(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]

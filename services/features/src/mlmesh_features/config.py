"""Feature service settings (environment prefix MLMESH_FEATURES_)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from mlmesh_metering.metering import MeteringSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class FeaturesSettings(MeteringSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_FEATURES_", extra="ignore")
    service_name: ClassVar[str] = "features"

    # The Feast repository: its registry, online store (SQLite by default),
    # computed views and the applied definitions' history.
    root: Path = Path(".mlmesh/features")
    # The online store: empty for SQLite in the root, or a Redis URL
    # (redis://host:port/db) for Feast's Redis online store.
    online_store: str = ""
    # Feast's registry: empty for a file in the root, or a SQLAlchemy URL
    # (postgresql://...) for Feast's SQL registry.
    registry: str = ""
    # Longest wait for a Feast call (an online store that hangs).
    store_timeout_seconds: float = 10.0
    # Long-running operations (Materialize, GetHistoricalFeatures): how many
    # may wait to run (one more is RESOURCE_EXHAUSTED), and a Materialize
    # chunk's size in source events (bounds a chunk's rows in memory).
    max_pending_operations: int = Field(default=16, ge=1, le=1000)
    materialize_chunk_events: int = Field(default=50_000, ge=1)
    # Load the Flink job's output (<root>/stream_out) into the online store
    # (streaming.loader); on under the runner, which runs the job.
    streaming: bool = False

    def online_store_config(self) -> dict[str, Any] | None:
        if not self.online_store:
            return None
        url = urlparse(self.online_store)
        if url.scheme != "redis":
            raise ValueError("MLMESH_FEATURES_ONLINE_STORE must be empty or redis://host:port/db")
        db = (url.path or "/0").lstrip("/") or "0"
        return {
            "type": "redis",
            "connection_string": f"{url.hostname or '127.0.0.1'}:{url.port or 6379},db={int(db)}",
        }

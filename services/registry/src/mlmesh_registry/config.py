"""Registry settings (environment prefix MLMESH_REGISTRY_)."""

from __future__ import annotations

from typing import ClassVar

from mlmesh_metering.metering import MeteringSettings
from pydantic_settings import SettingsConfigDict


class RegistrySettings(MeteringSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_REGISTRY_", extra="ignore")
    service_name: ClassVar[str] = "registry"

    # SQLAlchemy async URL. Default: SQLite under .mlmesh/. At scale:
    # postgresql+psycopg://user@host/db
    database_url: str = "sqlite+aiosqlite:///.mlmesh/registry.db"
    # fsspec URL of the artifact store: a local directory or s3://, gs://...
    artifact_url: str = ".mlmesh/artifacts"
    # Largest accepted artifact.
    max_artifact_bytes: int = 20 * 1024**3
    # Largest accepted upload chunk (and the download chunk size).
    max_chunk_bytes: int = 4 * 1024 * 1024
    download_chunk_bytes: int = 1024 * 1024
    # An upload stream that sends nothing (header or chunk) for this long is
    # ended with ABORTED (UPLOAD_INCOMPLETE) and its partial file removed.
    upload_idle_timeout_seconds: float = 60.0
    # How often a watch stream polls the database for other replicas' events.
    watch_poll_seconds: float = 0.5
    # Seconds to wait for a database connection before answering UNAVAILABLE.
    database_connect_timeout: float = 2.0

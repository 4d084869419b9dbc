"""Batch service settings (environment prefix MLMESH_BATCH_)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from mlmesh_metering.metering import MeteringSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class BatchSettings(MeteringSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_BATCH_", extra="ignore")
    service_name: ClassVar[str] = "batch"

    # The service's folder: jobs' folders (driver config, status, logs), the
    # model cache, the local Ray head, the demo dataset.
    root: Path = Path(".mlmesh/batch")
    # Job state. Default: SQLite under root. At scale:
    # postgresql+psycopg://user@host/db
    database_url: str = ""
    # Folders `file://` URIs may name (comma-separated; default: root/data
    # and root/output). Anything else is refused.
    allowed_roots: str = ""
    # Other fsspec protocols jobs may read and write (comma-separated, e.g.
    # "s3,gs"; their fsspec packages must be installed).
    allowed_protocols: str = ""
    # A Ray cluster (host:port of its GCS; a KubeRay head service). Empty:
    # a local head this service starts and keeps.
    ray_address: str = ""
    # The cluster's auth token file, when it uses token auth.
    ray_token_file: Path | None = None
    # The local head stops after this many seconds without a running job
    # (0: never), and starts again with the next job (a cold start: ~10 s).
    ray_idle_stop_seconds: float = Field(default=0.0, ge=0)
    # Cores the model actors share (per node); default: this machine's.
    cores: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=1024)
    # The registry (model versions) and the gateway (online stages).
    registry_target: str = "127.0.0.1:8080"
    gateway_target: str = ""
    # Jobs whose drivers run at once; others wait QUEUED.
    max_running_jobs: int = Field(default=1, ge=1, le=64)
    # Jobs a key may have QUEUED or RUNNING; one more is RESOURCE_EXHAUSTED.
    max_active_jobs_per_key: int = Field(default=8, ge=1, le=10_000)
    # Times a job's driver is started again after it died before the job
    # FAILS (a restart resumes from the committed parts).
    max_attempts: int = Field(default=3, ge=1, le=100)
    # How often the service reads running jobs' status files.
    poll_seconds: float = Field(default=0.25, gt=0, le=10)
    # Seconds a cancelled driver has to stop before it is killed.
    cancel_grace_seconds: float = Field(default=3.0, gt=0, le=60)
    # Output rows per committed part (and the longest wait for one).
    part_rows: int = Field(default=2000, ge=1, le=10_000_000)
    part_seconds: float = Field(default=2.0, gt=0, le=600)
    # Write the demo dataset under root/data/demo (on under the runner).
    demo: bool = False

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.root}/batch.db"

    def roots(self) -> list[Path]:
        named = [Path(p) for p in self.allowed_roots.split(",") if p.strip()]
        return named or [self.root / "data", self.root / "output"]

    def protocols(self) -> list[str]:
        return [p.strip() for p in self.allowed_protocols.split(",") if p.strip()]

"""Review service settings (environment prefix MLMESH_REVIEW_)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from mlmesh_metering.metering import MeteringSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class ReviewSettings(MeteringSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_REVIEW_", extra="ignore")
    service_name: ClassVar[str] = "review"

    # The service's folder: the SQLite database, export files being written.
    root: Path = Path(".mlmesh/review")
    # The queue. Default: SQLite under root. At scale:
    # postgresql+psycopg://user@host/db
    database_url: str = ""
    # The registry the exports are uploaded to (with this service's key).
    registry_target: str = "127.0.0.1:8080"
    # A claim's lease when ClaimItem does not say.
    default_lease_seconds: float = Field(default=600.0, ge=1, le=3600)
    # SubmitItems refuses new items (RESOURCE_EXHAUSTED) while this many wait
    # OPEN: a runaway source cannot fill the disk.
    max_open_items: int = Field(default=100_000, ge=1, le=100_000_000)
    # ReportPrediction refuses a key's new reports (RESOURCE_EXHAUSTED) while
    # this many of its reports wait undecided: one key cannot fill the queue.
    max_open_reports_per_key: int = Field(default=100, ge=1, le=1_000_000)
    # The reviewers' page (mlmesh_review.web) is served on this port when set
    # (0: any free port; the runner sets it). Unset: gRPC only.
    http_port: int | None = None
    # How often the queue-depth gauges are read from the database.
    stats_seconds: float = Field(default=5.0, gt=0, le=600)

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.root}/review.db"

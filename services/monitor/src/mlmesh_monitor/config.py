"""Monitor settings (environment prefix MLMESH_MONITOR_)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from mlmesh_metering.metering import MeteringSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class MonitorSettings(MeteringSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_MONITOR_", extra="ignore")
    service_name: ClassVar[str] = "monitor"

    # The service's folder (its SQLite database by default).
    root: Path = Path(".mlmesh/monitor")
    # Predictions, feedback, references. Default: SQLite under root. At
    # scale: postgresql+psycopg://user@host/db
    database_url: str = ""
    # GetModelQuality reads at most this many of a window's newest
    # predictions (the figures are over those).
    quality_max_rows: int = Field(default=200_000, ge=100, le=10_000_000)
    # GetDrift's default and largest max_rows.
    drift_max_rows: int = Field(default=20_000, ge=10, le=1_000_000)
    # GetDrift says INSUFFICIENT_DATA below this many rows.
    drift_min_rows: int = Field(default=30, ge=1, le=1_000_000)
    # The exported gauges (accuracy, precision, recall, PSI, drift status)
    # are recomputed this often, over this window.
    metrics_refresh_seconds: float = Field(default=30.0, gt=0, le=3600)
    metrics_window_seconds: float = Field(default=3600.0, ge=60, le=2_592_000)
    # Keep predictions this long (older ones are deleted at each refresh;
    # 0: forever).
    retention_days: float = Field(default=30.0, ge=0, le=3650)
    # Low-confidence predictions to the review queue (mlmesh_monitor.review):
    # the review service (empty: off); per model "threshold:max_rate"
    # ("digits=0.6:0.2": when more than 20% of its predictions over the
    # window are under 0.6 confident, the newest such are submitted); the
    # window; the fewest predictions to judge a rate; items per check.
    review_target: str = ""
    low_confidence: str = ""
    low_confidence_window_seconds: float = Field(default=3600.0, ge=60, le=2_592_000)
    low_confidence_min_predictions: int = Field(default=20, ge=1, le=1_000_000)
    low_confidence_max_items: int = Field(default=100, ge=1, le=100)
    # Set the classic demo model's ("digits") default drift reference from
    # its training data at start, unless one is set (on under the runner).
    demo: bool = False

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.root}/monitor.db"

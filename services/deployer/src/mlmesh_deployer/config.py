"""Deployer settings (environment prefix MLMESH_DEPLOYER_)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from mlmesh_metering.metering import MeteringSettings
from pydantic_settings import SettingsConfigDict


class DeployerSettings(MeteringSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_DEPLOYER_", extra="ignore")
    service_name: ClassVar[str] = "deployer"

    # Comma-separated references to keep live on Triton (one alias per model).
    models: str = "digits@champion,minilm@champion,digitclip@champion"
    registry_target: str = "127.0.0.1:8080"
    triton_target: str = "127.0.0.1:8001"
    # Triton's model repository (Triton runs with --model-control-mode=explicit).
    repository: Path = Path(".mlmesh/triton-repository")
    # Downloaded versions.
    cache_dir: Path = Path(".mlmesh/deployer-cache")
    # How often live versions are checked against Triton (a restarted Triton
    # comes back empty-handed until its models are loaded again).
    reconcile_seconds: float = 2.0
    # Longest wait for a version to become ready on Triton.
    load_timeout_seconds: float = 300.0
    # First wait before retrying a version that failed to deploy; doubles on
    # each failure up to max_retry_seconds (a broken artifact is not retried
    # every 2 s forever).
    retry_seconds: float = 2.0
    max_retry_seconds: float = 300.0
    # Limits on one artifact once unpacked (sparse members, links and device
    # files are always refused).
    unpack_max_members: int = 100_000
    unpack_max_bytes: int = 64 * 1024**3

    def references(self) -> list[str]:
        return [part.strip() for part in self.models.split(",") if part.strip()]

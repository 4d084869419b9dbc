"""Vector service settings (environment prefix MLMESH_VECTORS_)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from mlmesh_metering.metering import MeteringSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class VectorsSettings(MeteringSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_VECTORS_", extra="ignore")
    service_name: ClassVar[str] = "vectors"

    # The engine: "edge" (Qdrant's engine in process, data under `root`) or
    # "qdrant" (a Qdrant server or cluster at `qdrant_url`).
    backend: Literal["edge", "qdrant"] = "edge"
    # Embedded engine: collections, snapshots, the change log read replicas
    # follow, policies' decision logs.
    root: Path = Path(".mlmesh/vectors")
    # Cluster engine: the Qdrant URL (http://host:6333 or a load balancer in
    # front of a cluster) and a file holding its API key (empty: none).
    qdrant_url: str = ""
    qdrant_api_key_file: Path | None = None
    # Tests only: qdrant-client's local mode in this folder instead of a
    # server (a pure-Python stand-in; docs/architecture.md says what it
    # does not exercise).
    qdrant_local_path: Path | None = None
    # This instance's name from the runner (vectors, vectors.1, ...). With
    # the embedded engine the first instance is the primary (it owns the
    # data and takes every write: Envoy routes writes to it); the others are
    # read replicas that follow its change log.
    instance: str = "vectors"
    # How often a read replica looks for the primary's new writes: a write
    # is visible on a replica within about this (plus the time to apply it).
    follow_interval_seconds: float = Field(default=0.02, gt=0, le=5)
    # HNSW candidates a search keeps when the caller does not say.
    default_hnsw_ef: int = Field(default=64, ge=1, le=1024)
    # Triton (the models that embed texts and images) and their names there.
    triton_target: str = ""
    text_model: str = "minilm"
    image_model: str = "digitclip"
    # Seed the demo collections and policy (mlmesh_vectors.demo) once the
    # models are on Triton: on under the runner.
    demo: bool = False
    # Threads running engine calls (the engine holds the GIL while it
    # searches: more threads do not search faster; replicas do).
    engine_threads: int = Field(default=2, ge=1, le=64)
    # The human review queue (empty: content checks are not submitted):
    # checks whose best violation-labelled match scored within
    # review_near_margin of the policy's threshold (either side), and REVIEW
    # decisions, are submitted there off the request path.
    review_target: str = ""
    review_near_margin: float = Field(default=0.02, ge=0, le=1)

    @property
    def is_primary(self) -> bool:
        return "." not in self.instance

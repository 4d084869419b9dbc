"""What a serving component holds: the versions it must serve (follower)
and their unpacked folders (cache). Shared by the llm, the deployer and
batch inference."""

from mlmesh_serving.cache import ArtifactCache
from mlmesh_serving.follower import (
    MAX_RETRY_SECONDS,
    ServedVersions,
    backoff_delays,
    follow_served,
    read_served_versions,
)

__all__ = [
    "MAX_RETRY_SECONDS",
    "ArtifactCache",
    "ServedVersions",
    "backoff_delays",
    "follow_served",
    "read_served_versions",
]

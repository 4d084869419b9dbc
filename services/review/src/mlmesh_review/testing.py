"""A real review service in the caller's process, for the tests of the
services that submit to it (the gateway's shadows, the monitor's
low-confidence check, the vector service's content checks)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format
from mlmesh.gateway.v1 import gateway_pb2 as g
from mlmesh.gateway.v1 import key_directory_service_pb2 as kd
from mlmesh_chassis.testing import directory_key

from mlmesh_review.config import ReviewSettings
from mlmesh_review.server import build_server


@dataclass(frozen=True)
class LocalReview:
    target: str
    # A key with REVIEW_SUBMIT (a source's service key).
    submitter_secret: str
    # A key with REVIEW (a reviewer's).
    reviewer_secret: str


@contextlib.asynccontextmanager
async def local_review(folder: Path) -> AsyncIterator[LocalReview]:
    """Starts the review service on port 0 with its database under
    ``folder``, knowing a submitter's key and a reviewer's; exports are not
    reachable (no registry)."""
    submitter, submitter_secret = directory_key([g.PLATFORM_SERVICE_REVIEW_SUBMIT])
    reviewer, reviewer_secret = directory_key([g.PLATFORM_SERVICE_REVIEW])
    keys = folder / "review-keys.json"
    keys.write_text(
        json_format.MessageToJson(kd.WatchKeysResponse(snapshot=True, keys=[submitter, reviewer]))
    )
    host = await build_server(
        ReviewSettings(
            port=0,
            metrics_port=-1,
            drain_seconds=0.0,
            grace_seconds=1.0,
            bootstrap_keys_file=keys,
            root=folder / "review",
            registry_target="127.0.0.1:1",
        )
    )
    try:
        yield LocalReview(f"127.0.0.1:{host.port}", submitter_secret, reviewer_secret)
    finally:
        await host.shutdown()

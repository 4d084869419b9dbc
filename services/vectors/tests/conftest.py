"""Fixtures of the engine tests: each backend on a fresh folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mlmesh_vectors.engine.base import VectorBackend
from mlmesh_vectors.engine.edge import EdgeBackend
from mlmesh_vectors.engine.remote import RemoteBackend

# Unindexed vectors that start an edge index build in these tests: the
# recall test's 2,000 x 64 floats (500 KB) pass it, the other tests' small
# collections never do.
EDGE_INDEXING_THRESHOLD_KB = 128


@pytest.fixture
def edge_backend(tmp_path) -> Iterator[EdgeBackend]:
    # Filters and small segments walk the graph too (the service's default
    # full-scan threshold would search these collections exactly).
    backend = EdgeBackend(
        tmp_path / "edge",
        indexing_threshold_kb=EDGE_INDEXING_THRESHOLD_KB,
        full_scan_threshold_kb=EDGE_INDEXING_THRESHOLD_KB,
    )
    yield backend
    backend.close()


@pytest.fixture
def remote_backend(tmp_path) -> Iterator[RemoteBackend]:
    """qdrant-client's local mode in a folder (what it does not exercise:
    remote.py's docstring)."""
    backend = RemoteBackend(path=str(tmp_path / "qdrant-local"))
    yield backend
    backend.close()


@pytest.fixture(params=["edge_backend", "remote_backend"], ids=["edge", "remote"])
def backend(request) -> VectorBackend:
    return request.getfixturevalue(request.param)

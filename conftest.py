"""Hooks for every test directory (libs/, services/, tests/)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Importing feast (feast/metrics.py) puts prometheus_client into its
# multi-process mode for the whole process and every child it starts, by
# setting these variables. The services never use that mode; in one test
# process it turns a later test's Gauge.clear() into a UserWarning (an
# error here) and leaks into the meshes the tests start.
_MULTIPROCESS = ("PROMETHEUS_MULTIPROCESS_DIR", "PROMETHEUS_MULTIPROC_DIR")
_GIVEN = {name for name in _MULTIPROCESS if name in os.environ}


def _forget_multiprocess_mode() -> None:
    for name in _MULTIPROCESS:
        if name not in _GIVEN:
            os.environ.pop(name, None)


def pytest_collection_finish(session: pytest.Session) -> None:
    _forget_multiprocess_mode()


@pytest.fixture(autouse=True)
def _no_prometheus_multiprocess_mode() -> Iterator[None]:
    _forget_multiprocess_mode()
    yield
    _forget_multiprocess_mode()

"""Plumbing for the LLM benchmarks (not a benchmark itself).

``running_llm_mesh()`` is ``_common.running_mesh()`` for a subset of the
runner's catalog: the registry and the llm service only (plus Envoy), so the
other catalog services (Triton, the deployer, ...) neither slow the start nor
take CPU from what is measured. Always stops what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import _common as common
from mlmesh_runner.catalog import CATALOG
from mlmesh_runner.supervisor import Mesh

LLM_SERVICES = ("registry", "llm")


def catalog_subset(names: Sequence[str]) -> list[Any]:
    """The catalog's specs named in ``names``, in the catalog's order."""
    specs = [spec for spec in CATALOG if spec.name in names]
    missing = set(names) - {spec.name for spec in specs}
    if missing:
        raise RuntimeError(f"not in the runner's catalog: {sorted(missing)}")
    return specs


@contextlib.asynccontextmanager
async def running_llm_mesh(
    args: Any, names: Sequence[str] = LLM_SERVICES
) -> AsyncIterator[tuple[Mesh, dict[str, Any], Path]]:
    """Starts registry + llm + Envoy in a fresh temp dir; yields (mesh, ready, workdir)."""
    workdir = Path(tempfile.mkdtemp(prefix="mlmesh-bench-", dir=args.tmpdir))
    mesh = Mesh(
        workdir / "state",
        listen_port=0,
        admin_port=0,
        envoy_concurrency=args.envoy_concurrency,
        catalog=catalog_subset(names),
    )
    try:
        started = time.monotonic()
        ready = await asyncio.wait_for(mesh.start(), 300)
        common.log.info("mesh up in %.1fs: %s", time.monotonic() - started, ready["address"])
        yield mesh, ready, workdir
    finally:
        # Runs on errors and cancellation too (Ctrl-C, SIGTERM, --max-seconds).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(mesh.stop(), 60)
        if args.keep_state:
            print(f"state kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

"""The classic demo model's drift reference: "digits" (all versions without
their own) from the data mlmesh_triton.build trains it on, scikit-learn's
8x8 digits (64 pixel features, 0..16)."""

from __future__ import annotations

import logging

import numpy as np
from mlmesh.monitor.v1 import monitor_pb2 as pb

from mlmesh_monitor.drift import normalized, reference_from_rows
from mlmesh_monitor.store import MonitorStore

log = logging.getLogger("mlmesh.monitor")
DEMO_MODEL = "digits"


def digits_reference() -> pb.DriftReference:
    from sklearn.datasets import load_digits

    data = load_digits()
    rows = np.asarray(data.data, dtype=np.float64)
    names = [f"pixel_{i // 8}_{i % 8}" for i in range(rows.shape[1])]
    return normalized(
        pb.DriftReference(
            model=DEMO_MODEL,
            version=0,
            features=reference_from_rows(rows, bins=10, names=names),
            source="sklearn.datasets.load_digits (the digits model's training data)",
        )
    )


async def ensure_demo_reference(store: MonitorStore) -> None:
    import asyncio

    if await store.has_reference(DEMO_MODEL, 0):
        return
    reference = await asyncio.to_thread(digits_reference)
    await store.set_reference(reference)
    log.info("demo drift reference set for %s (%d features)", DEMO_MODEL, len(reference.features))

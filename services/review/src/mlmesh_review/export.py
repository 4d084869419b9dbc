"""Decided items as a labelled dataset: one parquet file, uploaded to the
registry as the next version of ``{model}-review-labels`` (format
``parquet-dataset``), its lineage listing the items and the query."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from mlmesh_chassis.errors import FailedPrecondition
from mlmesh_sdk.registry import RegistryClient

from mlmesh_review.queue import item_name

DATASET_FORMAT = "parquet-dataset"
_SUFFIX = "-review-labels"
# Registry model names: ^[a-z][a-z0-9-]{1,62}$ (63 characters at most).
_MAX_NAME = 63

SCHEMA = pa.schema(
    [
        ("item", pa.string()),
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("model", pa.string()),
        ("model_version", pa.string()),
        ("alternative_model", pa.string()),
        ("alternative_version", pa.string()),
        ("request_id", pa.string()),
        ("inputs", pa.string()),
        ("primary_output", pa.string()),
        ("alternative_output", pa.string()),
        # JSON object of strings.
        ("context", pa.string()),
        ("verdict", pa.string()),
        ("correct_label", pa.string()),
        ("note", pa.string()),
        ("reviewer_key_id", pa.string()),
        ("escalation_reason", pa.string()),
        ("create_time", pa.timestamp("us", tz="UTC")),
        ("decide_time", pa.timestamp("us", tz="UTC")),
    ]
)


def dataset_name(model: str) -> str:
    """``{model}-review-labels``; a model name too long for the suffix is cut
    to 40 characters and followed by 8 hex digits of its sha256."""
    name = model + _SUFFIX
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{model[:40].rstrip('-')}-{digest}{_SUFFIX}"


def table_of(rows: Sequence[Any]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for row in rows:
        columns["item"].append(item_name(row.id))
        for name in (
            "source",
            "source_id",
            "model",
            "model_version",
            "alternative_model",
            "alternative_version",
            "request_id",
            "inputs",
            "primary_output",
            "alternative_output",
            "context",
            "verdict",
            "correct_label",
            "note",
            "escalation_reason",
        ):
            columns[name].append(getattr(row, name))
        columns["reviewer_key_id"].append(row.reviewer)
        columns["create_time"].append(row.create_us)
        columns["decide_time"].append(row.decide_us)
    return pa.Table.from_pydict(
        {name: pa.array(values, type=SCHEMA.field(name).type) for name, values in columns.items()},
        schema=SCHEMA,
    )


async def write_parquet(pages: AsyncIterator[list[Any]], path: Path) -> list[str]:
    """Writes the pages' rows to ``path`` a page at a time (off the event
    loop); the item names, in order."""
    writer = await asyncio.to_thread(pq.ParquetWriter, path, SCHEMA, compression="zstd")
    names: list[str] = []
    try:
        async for rows in pages:
            names += [item_name(r.id) for r in rows]
            table = await asyncio.to_thread(table_of, rows)
            await asyncio.to_thread(writer.write_table, table)
    finally:
        await asyncio.to_thread(writer.close)
    return names


def _scratch_folder(scratch: Path) -> str:
    scratch.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(dir=scratch)


@dataclass(frozen=True)
class Exported:
    dataset: str
    version: int
    item_count: int
    sha256: str
    size_bytes: int


async def export(
    pages: AsyncIterator[list[Any]],
    model: str,
    query: dict[str, Any],
    exported_by: str,
    registry: RegistryClient,
    scratch: Path,
) -> Exported:
    """Writes the pages' rows (DECIDED items) and uploads them as a dataset
    version; FAILED_PRECONDITION when there is none."""
    dataset = dataset_name(model)
    folder = Path(await asyncio.to_thread(_scratch_folder, scratch))
    try:
        path = folder / f"{dataset}.parquet"
        names = await write_parquet(pages, path)
        if not names:
            raise FailedPrecondition(
                f"model {model} has no decided review items to export", model=model
            )
        version = await registry.upload_file(
            dataset,
            path,
            description=(
                f"Reviewed items of model {model} ({len(names)}), labelled by human "
                "reviewers in the review queue."
            ),
            tags={"source": "review", "model": model, "items": str(len(names))},
            format=DATASET_FORMAT,
            run_metadata={
                "items": names,
                "query": query,
                "item_count": len(names),
                "exported_by": exported_by,
                "columns": SCHEMA.names,
            },
            create_model=True,
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, folder, True)
    return Exported(dataset, int(version.version), len(names), version.sha256, version.size_bytes)

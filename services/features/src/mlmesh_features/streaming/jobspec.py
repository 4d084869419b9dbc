"""The Flink job's spec: the definitions in force, compiled to the JSON that
job.py reads (the format is in docs: the streaming interface). Only windowed
views over stream sources stream; row views and batch sources stay batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlmesh_features.definitions import Definitions

CHECKPOINT_INTERVAL_MS = 1000
WATERMARK_DELAY_MS = 2000
MONITOR_INTERVAL_MS = 200


def _ms(delta: Any) -> int:
    return int(delta.total_seconds() * 1000)


def compile_spec(
    defs: Definitions,
    root: Path,
    *,
    checkpoint_interval_ms: int = CHECKPOINT_INTERVAL_MS,
    watermark_delay_ms: int = WATERMARK_DELAY_MS,
    monitor_interval_ms: int = MONITOR_INTERVAL_MS,
) -> dict[str, Any]:
    """The job spec of ``defs``, with the event log, outputs and late outputs
    under the features ``root``."""
    views = [
        view
        for view in defs.feature_views.values()
        if view.windowed and defs.sources[view.source].kind == "stream"
    ]
    sources = {}
    for name in sorted({view.source for view in views}):
        source = defs.sources[name]
        sources[name] = {
            "path": str(root / "eventlog" / name),
            "columns": dict(source.columns),
            "late_output": str(root / "stream_late" / name),
        }
    compiled = []
    for view in sorted(views, key=lambda v: v.name):
        assert view.step is not None
        compiled.append(
            {
                "name": view.name,
                "source": view.source,
                "keys": defs.join_keys(view),
                "step_ms": _ms(view.step),
                "output": str(root / "stream_out" / view.name),
                "aggregations": [
                    {
                        "name": a.name,
                        "function": a.function,
                        "column": a.column or None,
                        "window_ms": _ms(a.window),
                        "type": a.type,
                    }
                    for a in view.aggregations
                ],
            }
        )
    return {
        "checkpoint_interval_ms": checkpoint_interval_ms,
        "watermark_delay_ms": watermark_delay_ms,
        "monitor_interval_ms": monitor_interval_ms,
        "sources": sources,
        "views": compiled,
    }


def write_spec(spec: dict[str, Any], path: Path) -> None:
    """Writes ``spec`` to ``path`` whole or not at all (a temporary file in
    the same folder, fsynced, then renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as file:
        json.dump(spec, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)

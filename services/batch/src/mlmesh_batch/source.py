"""The read stage: a Ray Data datasource over a job's input files.

Ray Data's own file readers list the files in a task of one whole CPU first
(measured here: 10 to 25 s before the first row, on 2 cores) and read a
parquet file as a single block unless it is repartitioned. This source takes
the files the driver already resolved, makes one read task per parquet row
group range or JSON lines file, and each task *streams* blocks of
``block_rows`` rows (``ParquetFile.iter_batches``), so the first block
reaches the model actors within a moment, and several actors get work even
from one file with one row group.

Each task also does the row bookkeeping (``stages.prepare``: error columns,
the input row for the errors output) and drops the ids a resumed job already
wrote, so no extra operator runs for them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from mlmesh_batch import stages
from mlmesh_batch.plan import ERROR_MESSAGE, ERROR_REASON, ERROR_STAGE, INPUT_ROW

# Rows a read task covers (several tasks keep reads going in parallel).
TASK_ROWS = 50_000
# Characters of one JSON line: a longer one fails as a row, unread.
MAX_LINE = 4 << 20


def _lines(handle: Any) -> Iterator[str | None]:
    """The file's lines, each read at most MAX_LINE characters at a time; a
    longer line is skipped whole and yields None."""
    while True:
        line = handle.readline(MAX_LINE)
        if not line:
            return
        if len(line) < MAX_LINE or line.endswith("\n"):
            yield line
            continue
        while line and not line.endswith("\n"):  # the rest of the long line
            line = handle.readline(MAX_LINE)
        yield None


class InputSource(Datasource):  # type: ignore[misc]
    def __init__(
        self,
        files: list[str],
        fs: Any,
        fmt: str,
        columns: list[str],
        id_column: str,
        block_rows: int,
        written: frozenset[Any] = frozenset(),
    ) -> None:
        self.files = files
        self.fs = fs
        self.fmt = fmt
        self.columns = columns
        self.id_column = id_column
        self.block_rows = max(block_rows, 1)
        self.written = written

    def get_name(self) -> str:
        return "JobInput"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def task_count(self) -> int:
        return len(self._pieces())

    def _pieces(self) -> list[tuple[str, list[int], int]]:
        """(file, row groups (parquet; [] for JSON lines), rows)."""
        pieces: list[tuple[str, list[int], int]] = []
        for path in self.files:
            if self.fmt != "parquet":
                pieces.append((path, [], 0))
                continue
            with self.fs.open(path, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
            group: list[int] = []
            rows = 0
            for index in range(meta.num_row_groups):
                group.append(index)
                rows += meta.row_group(index).num_rows
                if rows >= TASK_ROWS:
                    pieces.append((path, group, rows))
                    group, rows = [], 0
            if group:
                pieces.append((path, group, rows))
        return pieces

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        del parallelism, data_context
        tasks = []
        for path, groups, rows in self._pieces():
            metadata = BlockMetadata(
                num_rows=rows or None, size_bytes=None, exec_stats=None, input_files=(path,)
            )
            tasks.append(
                ReadTask(
                    functools.partial(self._read, path, groups),
                    metadata,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks

    def _read(self, path: str, groups: list[int]) -> Iterator[pa.Table]:
        for table in self._tables(path, groups):
            table = stages.skip_written(table, self.id_column, self.written)
            if table.num_rows:
                prepared = ERROR_STAGE in table.column_names  # broken JSON lines
                yield table if prepared else stages.prepare(table, self.id_column)

    def _tables(self, path: str, groups: list[int]) -> Iterator[pa.Table]:
        if self.fmt == "parquet":
            with self.fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                for batch in parquet.iter_batches(
                    batch_size=self.block_rows, row_groups=groups, columns=self.columns
                ):
                    yield pa.Table.from_batches([batch])
            return
        rows: list[dict[str, Any]] = []
        broken: list[tuple[int, str]] = []
        with self.fs.open(path, "rt", encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(_lines(handle), 1):
                if line is None:
                    broken.append((number, f"longer than {MAX_LINE} characters"))
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                    rows.append({c: row.get(c) for c in self.columns})
                except ValueError as error:
                    broken.append((number, str(error)[:200]))
                if len(rows) + len(broken) >= self.block_rows:
                    yield from self._json_block(path, rows, broken)
                    rows, broken = [], []
        if rows or broken:
            yield from self._json_block(path, rows, broken)

    def _json_block(
        self, path: str, rows: list[dict[str, Any]], broken: list[tuple[int, str]]
    ) -> Iterator[pa.Table]:
        if rows:
            yield pa.Table.from_pylist(rows)
        # A line that is not JSON fails alone. Its id is unknown (null, so the
        # id column keeps its type); it is known by where it is instead,
        # `<file>:<line>`, which a resumed job skips like an id.
        name = path.rsplit("/", 1)[-1]
        lines = [(n, m) for n, m in broken if f"{name}:{n}" not in self.written]
        if lines:
            count = len(lines)
            yield pa.table(
                {
                    self.id_column: pa.nulls(count),
                    ERROR_STAGE: pa.array(["read"] * count),
                    ERROR_REASON: pa.array(["INPUT_INVALID"] * count),
                    ERROR_MESSAGE: pa.array([f"line {n}: {m}" for n, m in lines]),
                    INPUT_ROW: pa.array([json.dumps({"line": f"{name}:{n}"}) for n, _ in lines]),
                }
            )

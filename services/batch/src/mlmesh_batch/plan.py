"""A job's plan: what its driver runs, fixed when the job is accepted.

The plan is the job's request with everything resolved: model aliases pinned
to versions, defaults filled in, URIs normalized. It is stored with the job
(JSON) and handed to the driver, so a restarted or resumed job runs exactly
the same stages on the same versions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

# Reserved columns the stages add to every row (dropped before writing).
ERROR_STAGE = "_error_stage"
ERROR_REASON = "_error_reason"
ERROR_MESSAGE = "_error_message"
INPUT_ROW = "_input_row"
BUSY_PREFIX = "_busy_"
RESERVED_PREFIX = "_"

EMBED, CLASSIFY, GENERATE = "embed", "classify", "generate"
IN_PROCESS, ONLINE = "in_process", "online"


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: str  # "model" or "callable"
    input_column: str
    output_column: str
    parameters: dict[str, Any] = field(default_factory=dict)
    # model stages
    model: str = ""
    version: int = 0
    task: str = ""
    execution: str = ""
    batch_size: int = 64
    concurrency: int = 1
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    # callable stages
    function: str = ""

    @property
    def model_version(self) -> str:
        return f"{self.model}@{self.version}" if self.kind == "model" else ""

    def written_columns(self) -> list[str]:
        """The columns the stage adds (or replaces) on every row."""
        if self.kind != "model":
            return [self.output_column]
        columns = [self.output_column]
        if self.task == CLASSIFY:
            columns.append(f"{self.output_column}_score")
        columns.append(f"{self.output_column}_model")
        return columns


@dataclass(frozen=True)
class JobPlan:
    job_id: str
    input_uri: str
    input_format: str  # "parquet" or "jsonl"
    id_column: str
    keep_columns: list[str]
    stages: list[StagePlan]
    output_uri: str
    error_uri: str
    max_failed_rows: int = 0
    # Rows per committed output part (a part is written when it is full, or
    # after part_seconds with rows waiting, whichever comes first).
    part_rows: int = 2000
    part_seconds: float = 2.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobPlan:
        data = json.loads(text)
        data["stages"] = [StagePlan(**stage) for stage in data["stages"]]
        return cls(**data)

    @property
    def online(self) -> bool:
        """Whether a stage calls the online services with the submitter's key."""
        return any(stage.execution == ONLINE for stage in self.stages)

    def output_columns(self) -> list[str]:
        """The output's columns, in order: id, kept, then each stage's."""
        columns = [self.id_column, *[c for c in self.keep_columns if c != self.id_column]]
        for stage in self.stages:
            columns += [c for c in stage.written_columns() if c not in columns]
        return columns

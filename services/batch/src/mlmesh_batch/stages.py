"""The functions Ray Data maps over a job's batches (pyarrow tables).

Every row carries three error columns, null while it is healthy. A stage
skips rows that failed earlier, and a row that fails in it gets the stage's
name, a reason and a message; it travels on to the driver, which writes it
to the errors output. A stage also adds ``_busy_<stage>``: its seconds spread
over the batch's rows (summed by the driver: the stage's busy time).

- ``prepare``: the first map; adds the error columns and ``_input_row``
  (the row as read, JSON, for the errors output).
- ``CallableStage``: a registered callable, in Ray tasks.
- ``ModelStage``: a registry model in Ray actors; each actor downloads the
  pinned version once (``mlmesh_serving.ArtifactCache``, the loader the
  online services use) and runs it with the serving code
  (``models.InProcessModel``).
- ``OnlineStage``: calls the gateway through Envoy with the submitter's key,
  so the job is throttled, routed and metered like any caller.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlmesh_batch import callables
from mlmesh_batch.plan import (
    BUSY_PREFIX,
    CLASSIFY,
    EMBED,
    ERROR_MESSAGE,
    ERROR_REASON,
    ERROR_STAGE,
    GENERATE,
    INPUT_ROW,
    StagePlan,
)

MAX_MESSAGE = 500  # characters of a row's error message
MAX_INPUT_ROW = 65_536  # characters of a row kept for the errors output


def prepare(table: pa.Table, id_column: str) -> pa.Table:
    rows = table.to_pylist()
    inputs = []
    for row in rows:
        text = json.dumps(row, default=str)
        inputs.append(text if len(text) <= MAX_INPUT_ROW else text[:MAX_INPUT_ROW])
    n = table.num_rows
    empty = pa.nulls(n, pa.string())
    table = table.append_column(ERROR_STAGE, empty)
    table = table.append_column(ERROR_REASON, empty)
    table = table.append_column(ERROR_MESSAGE, empty)
    table = table.append_column(INPUT_ROW, pa.array(inputs, pa.string()))
    # Null ids cannot be checkpointed: they fail here.
    ids = table.column(id_column)
    if ids.null_count:
        table = _fail(table, pc.is_null(ids).to_pylist(), "read", "INPUT_INVALID", "the id is null")
    return table


def skip_written(table: pa.Table, id_column: str, written: frozenset[Any]) -> pa.Table:
    """The rows whose id is not among those a resumed job already wrote
    (``written`` may mix types: ids and `<file>:<line>` keys)."""
    if not written:
        return table
    keep = [value not in written for value in table.column(id_column).to_pylist()]
    return table if all(keep) else table.filter(pa.array(keep))


def _values(table: pa.Table, column: str) -> list[Any]:
    """A column's values; all None where a block lacks it (a block of JSON
    lines that did not parse: its rows failed already)."""
    if column in table.column_names:
        return table.column(column).to_pylist()  # type: ignore[no-any-return]
    return [None] * table.num_rows


def _healthy(table: pa.Table) -> list[bool]:
    return pc.is_null(table.column(ERROR_STAGE)).to_pylist()  # type: ignore[no-any-return]


def _fail(table: pa.Table, mask: list[bool], stage: str, reason: str, message: Any) -> pa.Table:
    """Marks the rows of ``mask`` failed (``message``: one text, or one per row)."""
    messages: list[Any] = message if isinstance(message, list) else [message] * len(mask)
    columns: dict[str, list[Any]] = {
        ERROR_STAGE: [stage] * len(mask),
        ERROR_REASON: [reason] * len(mask),
        ERROR_MESSAGE: [str(m)[:MAX_MESSAGE] if m is not None else None for m in messages],
    }
    for name, values in columns.items():
        old = table.column(name).to_pylist()
        new = [v if hit else o for v, o, hit in zip(values, old, mask, strict=True)]
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.array(new, pa.string())
        )
    return table


def _set(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    index = table.schema.get_field_index(name)
    if index >= 0:
        return table.set_column(index, name, array)
    return table.append_column(name, array)


def _busy(table: pa.Table, stage: str, seconds: float) -> pa.Table:
    share = seconds / max(table.num_rows, 1)
    return _set(table, f"{BUSY_PREFIX}{stage}", pa.array(np.full(table.num_rows, share)))


class CallableStage:
    """A registered callable applied row by row (a Ray task per batch)."""

    def __init__(self, stage: StagePlan) -> None:
        self.stage = stage
        self.apply: Callable[[Any], Any] = callables.make(stage.function, stage.parameters)

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        healthy = _healthy(table)
        values = _values(table, self.stage.input_column)
        out: list[Any] = [None] * len(values)
        failed = [False] * len(values)
        messages: list[str | None] = [None] * len(values)
        for i, (value, ok) in enumerate(zip(values, healthy, strict=True)):
            if not ok:
                continue
            try:
                out[i] = self.apply(value)
            except callables.RowError as error:
                failed[i], messages[i] = True, str(error)
            except Exception as error:  # a bug in the callable fails the row, not the job
                failed[i], messages[i] = True, f"{type(error).__name__}: {error}"
        table = _set(table, self.stage.output_column, pa.array(out))
        if any(failed):
            table = _fail(table, failed, self.stage.name, "ROW_FAILED", messages)
        return _busy(table, self.stage.name, time.perf_counter() - started)


def run_callable(table: pa.Table, stage: StagePlan) -> pa.Table:
    """A callable stage as a plain function (Ray Data runs it in tasks)."""
    return CallableStage(stage)(table)


def _embedding_column(vectors: list[np.ndarray | None]) -> pa.Array:
    return pa.array(
        [v.astype(np.float32).tolist() if v is not None else None for v in vectors],
        pa.list_(pa.float32()),
    )


class ModelStage:
    """A registry model version loaded once per Ray actor."""

    def __init__(
        self,
        stage: StagePlan,
        registry_target: str,
        cache_root: str,
        service_key_file: str,
        threads: int,
    ) -> None:
        # The serving code reads its torch threads from here (Triton's
        # instances take one each); an actor takes the CPUs it reserved.
        os.environ["MLMESH_TRITON_TORCH_THREADS"] = str(max(threads, 1))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import asyncio

        from mlmesh_chassis.auth import ServiceIdentity, set_service_identity
        from mlmesh_serving import ArtifactCache

        from mlmesh_batch.models import InProcessModel

        if service_key_file:
            set_service_identity(ServiceIdentity(Path(service_key_file)))
        self.stage = stage
        cache = ArtifactCache(Path(cache_root), registry_target)
        folder = asyncio.run(cache.folder(stage.model, stage.version))
        self.model = InProcessModel(folder, stage.model_version)
        self.text = self.model.input.data_type == "TYPE_STRING"

    def _run_sorted(self, values: list[Any]) -> list[Any]:
        """Runs the model in calls of batch_size rows; texts sorted by length
        first, so a call pads its texts to a similar length."""
        order = list(range(len(values)))
        if self.text:
            order.sort(key=lambda i: len(values[i]) if isinstance(values[i], str) else 0)
        results: list[Any] = [None] * len(values)
        size = max(self.stage.batch_size, 1)
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            for i, result in zip(chunk, self.model.run([values[i] for i in chunk]), strict=True):
                results[i] = result
        return results

    def __call__(self, table: pa.Table) -> pa.Table:
        from mlmesh_batch.models import RowFailure

        started = time.perf_counter()
        healthy = _healthy(table)
        values = _values(table, self.stage.input_column)
        positions = [i for i, ok in enumerate(healthy) if ok]
        results = self._run_sorted([values[i] for i in positions])
        n = table.num_rows
        failed = [False] * n
        messages: list[str | None] = [None] * n
        first: list[np.ndarray | None] = [None] * n
        for i, result in zip(positions, results, strict=True):
            if isinstance(result, RowFailure):
                failed[i], messages[i] = True, str(result)
            else:
                first[i] = next(iter(result.values()))
        out = self.stage.output_column
        if self.stage.task == CLASSIFY:
            labels = [int(np.argmax(v)) if v is not None else None for v in first]
            scores = [float(np.max(v)) if v is not None else None for v in first]
            table = _set(table, out, pa.array(labels, pa.int64()))
            table = _set(table, f"{out}_score", pa.array(scores, pa.float32()))
        else:
            table = _set(table, out, _embedding_column(first))
        version = [self.stage.model_version if ok else None for ok in healthy]
        table = _set(table, f"{out}_model", pa.array(version, pa.string()))
        if any(failed):
            table = _fail(table, failed, self.stage.name, "MODEL_REFUSED", messages)
        return _busy(table, self.stage.name, time.perf_counter() - started)


class OnlineStage:
    """Calls the gateway (Embed, Generate) with the submitter's key."""

    # Retries of one call that the service refused for now (throttled,
    # unavailable) before the rows fail.
    ATTEMPTS = 8

    def __init__(self, stage: StagePlan, gateway_target: str, api_key: str) -> None:
        import grpc
        from mlmesh.gateway.v1 import gateway_service_pb2_grpc

        self.stage = stage
        self.channel = grpc.insecure_channel(gateway_target)
        self.stub = gateway_service_pb2_grpc.GatewayServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),)

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        import grpc
        from mlmesh_chassis.errors import details_of

        delay = 0.2
        for attempt in range(self.ATTEMPTS):
            try:
                return method(request, metadata=self.metadata, timeout=120)
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                retryable = code in (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.UNAVAILABLE,
                )
                if not retryable or attempt == self.ATTEMPTS - 1:
                    raise
                details = details_of(error)
                wait = delay
                if details.retry_info is not None:
                    wait = max(details.retry_info.retry_delay.ToTimedelta().total_seconds(), 0.05)
                time.sleep(min(wait, 30.0))
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def _reference(self) -> Any:
        from mlmesh.common.v1.model_reference_pb2 import ModelReference

        return ModelReference(model=self.stage.model, version=self.stage.version)

    def _embed(self, texts: list[str]) -> list[Any]:
        from mlmesh.gateway.v1 import gateway_service_pb2 as pb

        response = self._call(
            self.stub.Embed, pb.EmbedRequest(model=self._reference(), texts=texts)
        )
        return [np.asarray(e.values, dtype=np.float32) for e in response.embeddings]

    def _generate(self, text: str) -> str:
        from mlmesh.gateway.v1 import gateway_pb2
        from mlmesh.gateway.v1 import gateway_service_pb2 as pb

        params = self.stage.parameters
        sampling = gateway_pb2.SamplingParams(
            max_tokens=int(params.get("max_tokens", 64)),
            temperature=float(params.get("temperature", 0.0)),
        )
        request = pb.GenerateRequest(model=self._reference(), text=text, sampling=sampling)
        delay = 0.2
        for attempt in range(self.ATTEMPTS):
            try:
                chunks = self.stub.Generate(request, metadata=self.metadata, timeout=300)
                return "".join(chunk.text for chunk in chunks)
            except Exception as error:
                import grpc

                if not isinstance(error, grpc.RpcError) or attempt == self.ATTEMPTS - 1:
                    raise
                if error.code() not in (  # type: ignore[attr-defined]
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.UNAVAILABLE,
                ):
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def _rows(self, values: list[Any]) -> list[Any]:
        """One result per value: the output, or an Exception (the row fails)."""
        import grpc

        def refused(error: Exception) -> Exception:
            if isinstance(error, grpc.RpcError):
                code = error.code().name  # type: ignore[attr-defined]
                return ValueError(f"{code}: {str(error.details())[:300]}")  # type: ignore[attr-defined]
            return error

        if self.stage.task == EMBED:
            try:
                return self._embed([str(v) for v in values])
            except grpc.RpcError:
                out: list[Any] = []
                for value in values:  # one by one: only the bad rows fail
                    try:
                        out.append(self._embed([str(value)])[0])
                    except grpc.RpcError as error:
                        out.append(refused(error))
                return out
        assert self.stage.task == GENERATE
        results: list[Any] = []
        for value in values:
            try:
                results.append(self._generate(str(value)))
            except grpc.RpcError as error:
                results.append(refused(error))
        return results

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        healthy = _healthy(table)
        values = _values(table, self.stage.input_column)
        positions = [i for i, ok in enumerate(healthy) if ok and isinstance(values[i], str)]
        n = table.num_rows
        failed = [ok and not isinstance(values[i], str) for i, ok in enumerate(healthy)]
        messages: list[str | None] = ["expected a text" if f else None for f in failed]
        outputs: list[Any] = [None] * n
        size = min(max(self.stage.batch_size, 1), 256)
        for start in range(0, len(positions), size):
            chunk = positions[start : start + size]
            for i, result in zip(chunk, self._rows([values[i] for i in chunk]), strict=True):
                if isinstance(result, Exception):
                    failed[i], messages[i] = True, str(result)
                else:
                    outputs[i] = result
        out = self.stage.output_column
        if self.stage.task == EMBED:
            table = _set(table, out, _embedding_column(outputs))
        else:
            table = _set(table, out, pa.array(outputs, pa.string()))
        version = [self.stage.model_version if ok else None for ok in healthy]
        table = _set(table, f"{out}_model", pa.array(version, pa.string()))
        if any(failed):
            table = _fail(table, failed, self.stage.name, "MODEL_REFUSED", messages)
        return _busy(table, self.stage.name, time.perf_counter() - started)

    def __del__(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()

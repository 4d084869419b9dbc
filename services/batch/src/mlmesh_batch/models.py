"""A registry model version run in process, with the code Triton runs.

The registry's Triton artifacts (``config.pbtxt`` and ``payload/``: the
python backend's ``model.py`` and its files, see ``mlmesh_triton.build``) are
what the online path serves. A batch actor runs the very same ``model.py``:
``TritonPythonModel.initialize`` with the artifact's folder, then
``execute`` with one request per row, so a row the model refuses (a bad
image, an empty text) fails alone, as it would online, while the model still
computes the whole batch in one call. ``triton_python_backend_utils`` is
provided by this module (the few names the python backend's models use);
nothing here depends on a Triton server.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_CONFIG_TENSOR = re.compile(r'\{\s*name:\s*"([A-Za-z0-9_]+)"\s+data_type:\s*(TYPE_[A-Z0-9]+)')
_MODULE_LOCK = threading.Lock()


class TritonError(Exception):
    """pb_utils.TritonError: a request's error, with Triton's code names."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Tensor:
    """pb_utils.Tensor."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name = name
        self._array = np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceRequest:
    def __init__(self, inputs: list[Tensor]) -> None:
        self._inputs = {tensor.name(): tensor for tensor in inputs}

    def inputs(self) -> list[Tensor]:
        return list(self._inputs.values())


class InferenceResponse:
    """pb_utils.InferenceResponse."""

    def __init__(
        self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None
    ) -> None:
        self._outputs = {tensor.name(): tensor for tensor in output_tensors or []}
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def output_tensors(self) -> list[Tensor]:
        return list(self._outputs.values())


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return request._inputs.get(name)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return response._outputs.get(name)


def _pb_utils_module() -> types.ModuleType:
    """This module's Triton names as ``triton_python_backend_utils``."""
    module = types.ModuleType("triton_python_backend_utils")
    for name in (
        "Tensor",
        "InferenceRequest",
        "InferenceResponse",
        "TritonError",
        "get_input_tensor_by_name",
        "get_output_tensor_by_name",
    ):
        setattr(module, name, globals()[name])
    return module


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # TYPE_FP32, TYPE_STRING...


def tensor_specs(config: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs a ``config.pbtxt`` declares, in order."""

    def block(key: str) -> list[TensorSpec]:
        match = re.search(rf"^\s*{key}\s*\[", config, re.M)
        if match is None:
            return []
        depth, end = 1, match.end()
        while depth and end < len(config):
            depth += {"[": 1, "]": -1}.get(config[end], 0)
            end += 1
        text = config[match.end() : end]
        return [TensorSpec(name, kind) for name, kind in _CONFIG_TENSOR.findall(text)]

    return block("input"), block("output")


class RowFailure(Exception):
    """One row's refusal by the model (its message is the reason)."""


class InProcessModel:
    """One registry version of a Triton python-backend model, loaded here.

    ``run(values)`` takes one input value per row and returns, per row,
    either the named outputs (arrays without the batch dimension) or a
    RowFailure.
    """

    def __init__(self, folder: Path, label: str) -> None:
        self.folder = Path(folder)
        self.label = label  # model@version, for messages
        config = (self.folder / "config.pbtxt").read_text()
        self.inputs, self.outputs = tensor_specs(config)
        if len(self.inputs) != 1 or not self.outputs:
            raise ValueError(
                f"{label}: a batch stage runs models of one input and at least one output "
                f"(config.pbtxt declares {len(self.inputs)} inputs, {len(self.outputs)} outputs)"
            )
        payload = self.folder / "payload"
        with _MODULE_LOCK:
            sys.modules.setdefault("triton_python_backend_utils", _pb_utils_module())
            if str(payload) not in sys.path:
                sys.path.insert(0, str(payload))
            spec = importlib.util.spec_from_file_location(
                f"mlmesh_batch_model_{abs(hash(str(payload)))}", payload / "model.py"
            )
            if spec is None or spec.loader is None:
                raise ValueError(f"{label}: no model.py in the artifact")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        self.model = module.TritonPythonModel()
        self.model.initialize(
            {
                "model_repository": str(self.folder),
                "model_version": "payload",
                "model_name": label.split("@", 1)[0],
            }
        )

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    def _tensor(self, value: Any) -> Tensor:
        if self.input.data_type == "TYPE_STRING":
            if not isinstance(value, str | bytes):
                raise RowFailure(f"expected a text, got {type(value).__name__}")
            data = value.encode("utf-8") if isinstance(value, str) else value
            return Tensor(self.input.name, np.array([[data]], dtype=object))
        try:
            array = np.asarray(value, dtype=np.float32).reshape(1, -1)
        except (TypeError, ValueError) as error:
            raise RowFailure(f"expected a list of numbers: {str(error)[:80]}") from None
        return Tensor(self.input.name, array)

    def run(self, values: list[Any]) -> list[dict[str, np.ndarray] | RowFailure]:
        results: list[dict[str, np.ndarray] | RowFailure | None] = [None] * len(values)
        requests: list[InferenceRequest] = []
        positions: list[int] = []
        for i, value in enumerate(values):
            try:
                requests.append(InferenceRequest([self._tensor(value)]))
                positions.append(i)
            except RowFailure as failure:
                results[i] = failure
        if requests:
            try:
                responses = self.model.execute(requests)
            except Exception:
                if len(requests) == 1:
                    raise
                # The batch failed as a whole: once per row, so only the
                # rows that fail alone are refused.
                responses = [self._one(request) for request in requests]
            for position, response in zip(positions, responses, strict=True):
                results[position] = self._outputs_of(response)
        return [r if r is not None else RowFailure("no result") for r in results]

    def _one(self, request: InferenceRequest) -> InferenceResponse:
        try:
            return self.model.execute([request])[0]  # type: ignore[no-any-return]
        except Exception as error:  # the row's own failure
            return InferenceResponse(error=TritonError(f"{type(error).__name__}: {error}"))

    def _outputs_of(self, response: InferenceResponse) -> dict[str, np.ndarray] | RowFailure:
        error = response.error()
        if error is not None:
            return RowFailure(error.message())
        outputs = {}
        for tensor in response.output_tensors():
            array = tensor.as_numpy()
            outputs[tensor.name()] = array[0] if array.shape[:1] == (1,) else array
        return outputs

    def close(self) -> None:
        finalize = getattr(self.model, "finalize", None)
        if finalize is not None:
            finalize()

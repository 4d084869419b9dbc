"""LLM service settings (environment prefix MLMESH_LLM_)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from mlmesh_metering.metering import MeteringSettings
from pydantic_settings import SettingsConfigDict


class LlmSettings(MeteringSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_LLM_", extra="ignore")
    service_name: ClassVar[str] = "llm"

    # vllm: vLLM's AsyncLLM (its CPU build here, run from the llm's own
    # environment .envs/llm; its CUDA build on GPU nodes); cpu: our own
    # continuous batching on torch CPU, the fallback where vLLM's CPU build
    # does not run; null: a zero-cost engine for measuring the service itself.
    engine: Literal["vllm", "cpu", "null"] = "vllm"
    # Comma-separated references to serve, e.g. "tiny-llama@champion".
    models: str = "tiny-llama@champion"
    # Where the registry answers (Envoy, or the registry itself).
    registry_target: str = "127.0.0.1:8080"
    # Downloaded model versions, one folder each.
    cache_dir: Path = Path(".mlmesh/llm-cache")
    # Every engine: batch slots (vLLM's max_num_seqs), waiting-queue bound
    # (vLLM: max_num_queued_reqs is slots + this), context cap (0: the model's).
    max_running: int = 32
    max_waiting: int = 256
    max_context: int = 0
    # vLLM: the KV cache of each engine, in MiB (vLLM would otherwise take a
    # share of the whole machine's memory). 256 MiB holds 64 full 1024-token
    # contexts of the tiny Llama (4 KiB per token in float32), so replicas and
    # hot swaps fit beside each other. MLMESH_LLM_VLLM_OPTIONS with
    # kv_cache_memory_bytes or gpu_memory_utilization replaces it.
    kv_cache_mib: int = 256
    # CPU engine: torch threads (0: half the CPUs, leaving the rest to the
    # event loop, gRPC and Envoy; measured faster on 2 cores), prefills per step.
    torch_threads: int = 0
    max_prefill_per_step: int = 8
    # null engine: seconds per token (0: as fast as it can), a stand-in for a
    # model's pace in load and routing tests.
    null_token_seconds: float = 0.0
    # vLLM: AsyncEngineArgs options as JSON (tensor_parallel_size, dtype,
    # enforce_eager, speculative_config, limit_mm_per_prompt, ...); they win
    # over the settings above.
    vllm_options: str = "{}"
    # (Unset max_tokens: mlmesh_chassis.generation.DEFAULT_MAX_TOKENS, one
    # default for the whole mesh, so the gateway reserves what is generated.)
    # Seconds between attempts to load a model the registry cannot give yet.
    load_retry_seconds: float = 2.0

    def references(self) -> list[str]:
        return [part.strip() for part in self.models.split(",") if part.strip()]

    def vllm(self) -> dict[str, Any]:
        options = json.loads(self.vllm_options)
        if not isinstance(options, dict):
            raise ValueError("MLMESH_LLM_VLLM_OPTIONS must be a JSON object")
        return options

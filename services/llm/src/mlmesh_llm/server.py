"""build_server(settings): engines, the model manager, and the server.

Health stays NOT_SERVING until every configured model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlmesh.gateway.v1.gateway_pb2 import PLATFORM_SERVICE_LLM
from mlmesh.llm.v1 import llm_service_pb2_grpc
from mlmesh_chassis.server import ServiceHost, start_service
from mlmesh_metering.metering import metered_calls

from mlmesh_llm.config import LlmSettings
from mlmesh_llm.engines.base import Engine
from mlmesh_llm.models import ModelManager
from mlmesh_llm.registration import REGISTRATION
from mlmesh_llm.servicer import LlmServicer
from mlmesh_llm.telemetry import export_engine_load


def engine_factory(settings: LlmSettings):  # type: ignore[no-untyped-def]
    """A function making one engine for one model folder, per the settings."""
    if settings.engine == "cpu":
        from mlmesh_llm.engines.cpu import CpuEngine

        def make_cpu(folder: Path) -> Engine:
            return CpuEngine(
                folder,
                max_running=settings.max_running,
                max_waiting=settings.max_waiting,
                max_context=settings.max_context or None,
                threads=settings.torch_threads or max(1, (os.cpu_count() or 2) // 2),
                max_prefill_per_step=settings.max_prefill_per_step,
            )

        return make_cpu
    if settings.engine == "vllm":
        from mlmesh_llm.engines.vllm import VllmEngine, VllmLimits

        options = settings.vllm()
        limits = VllmLimits(
            max_running=settings.max_running,
            max_waiting=settings.max_waiting,
            kv_cache_mib=settings.kv_cache_mib,
            max_context=settings.max_context,
        )

        def make_vllm(folder: Path) -> Engine:
            return VllmEngine(folder, options, limits)

        return make_vllm
    from mlmesh_llm.engines.null import NullEngine

    return lambda folder: NullEngine(token_seconds=settings.null_token_seconds)


async def build_server(settings: LlmSettings) -> ServiceHost:
    models = ModelManager(
        settings.references(),
        settings.registry_target,
        settings.cache_dir,
        engine_factory(settings),
        settings.load_retry_seconds,
    )
    host: ServiceHost | None = None

    async def engine_dead() -> None:
        if host is not None:
            await host.set_serving(False)

    servicer = LlmServicer(models, settings, on_engine_dead=engine_dead)

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        llm_service_pb2_grpc.add_LlmServiceServicer_to_server(servicer, server)
        return REGISTRATION.service_names()

    # Every caller's requests per minute and one usage event per call (the
    # gateway's service key too: the tokens of the model traffic it relays
    # are billed to the application's key by the gateway itself).
    admission, meter = metered_calls(settings, PLATFORM_SERVICE_LLM)
    # SERVING once every configured model is loaded.
    host = await start_service(
        settings, register, error_domain="mlmesh.llm", ready=models.ready.wait, admission=admission
    )
    host.on_close.append(models.stop)
    host.on_close.append(export_engine_load(lambda: models.loaded, settings.max_running))
    if meter is not None:
        host.on_close.append(meter.close)
    await models.start()
    return host

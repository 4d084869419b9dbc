"""build_server(settings): keys and their directory, the gateway's APIs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import (
    gateway_service_pb2_grpc,
    key_directory_service_pb2_grpc,
    key_service_pb2_grpc,
    usage_service_pb2_grpc,
)
from mlmesh_chassis.auth import KeyView, read_bootstrap_keys
from mlmesh_chassis.database import Database
from mlmesh_chassis.server import ServiceHost, start_service
from mlmesh_inference.triton import TritonClient
from mlmesh_metering import Metering
from mlmesh_metering.ledger import UsageLedger
from mlmesh_serving import ArtifactCache

from mlmesh_gateway.balancer import LatencyAwareBalancer
from mlmesh_gateway.config import GatewaySettings, names
from mlmesh_gateway.directory import ModelDirectory
from mlmesh_gateway.key_directory import KeyDirectory, KeyDirectoryServicer
from mlmesh_gateway.keys import KeyStore
from mlmesh_gateway.keys_servicer import KeyServicer
from mlmesh_gateway.openai_http import OpenAIHttp
from mlmesh_gateway.prediction_log import prediction_log
from mlmesh_gateway.prompt_tokens import PromptTokens
from mlmesh_gateway.registration import REGISTRATION
from mlmesh_gateway.servicer import GatewayServicer
from mlmesh_gateway.shadows import ShadowLog
from mlmesh_gateway.telemetry import REJECTIONS
from mlmesh_gateway.upstreams import Upstream, close_session, new_session, parse_upstreams
from mlmesh_gateway.usage_servicer import UsageServicer

log = logging.getLogger("mlmesh.gateway")


async def build_server(settings: GatewaySettings) -> ServiceHost:
    database = Database(
        settings.database_url,
        name="gateway",
        migrations=Path(__file__).parent / "migrations",
        version_table="alembic_version_gateway",
    )
    await database.migrate()
    # Shadow comparisons; disagreements also go to the review queue.
    shadow_log = ShadowLog(database, settings.review_target)
    keys = KeyStore(database)
    if settings.bootstrap_keys_file is not None:
        for entry in read_bootstrap_keys(settings.bootstrap_keys_file):
            if await keys.ensure(entry):
                log.info("bootstrap key added", extra={"key_id": entry.key.id})
    # The gateway is the keys' source: its own view is fed in process.
    view = KeyView()
    key_directory = KeyDirectory(keys, view, settings.key_poll_seconds)
    await key_directory.start()

    meter = Metering.from_settings(
        settings, service=pb.PLATFORM_SERVICE_GENERATE, database=database
    )
    meter.on_rejection = lambda decision: REJECTIONS.labels(decision.violated).inc()
    assert isinstance(meter.sink, UsageLedger)
    ledger = meter.sink
    llm = LatencyAwareBalancer.from_spec(
        settings.llm_endpoints, settings.region, settings.saturation
    )
    triton = TritonClient(settings.triton_target) if settings.triton_target else None
    directory = ModelDirectory(settings.registry_target) if settings.registry_target else None
    # Models behind OpenAI-compatible servers: one balancer each, one HTTP
    # client (keep-alive pools) for all.
    upstreams = parse_upstreams(settings.openai_upstreams)
    session = new_session() if upstreams else None
    balanced = {
        name: (
            spec,
            LatencyAwareBalancer.for_upstream(spec, session, settings.region, settings.saturation),
        )
        for name, spec in upstreams.items()
        if session is not None
    }
    tokens = None
    if settings.registry_target:
        cache = ArtifactCache(settings.tokenizer_cache_dir, settings.registry_target)
        tokens = PromptTokens(cache.folder)
    gateway = GatewayServicer(
        meter,
        llm,
        triton,
        names(settings.llm_models),
        names(settings.classic_models),
        names(settings.embedding_models),
        directory,
        shadow_log,
        balanced,
        tokens,
        prediction_log(settings),
    )
    # The OpenAI-compatible surface: bound before the port file is written.
    http = OpenAIHttp(gateway, view) if settings.http_port is not None else None
    extra_ports = {}
    if http is not None:
        assert settings.http_port is not None
        extra_ports["http_port"] = await http.start(settings.host, settings.http_port)
        if settings.http_port_file is not None:
            settings.http_port_file.write_text(str(extra_ports["http_port"]))
        log.info(
            "OpenAI-compatible API on http://%s:%d/v1", settings.host, extra_ports["http_port"]
        )

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        key_service_pb2_grpc.add_KeyServiceServicer_to_server(
            KeyServicer(keys, key_directory), server
        )
        key_directory_service_pb2_grpc.add_KeyDirectoryServiceServicer_to_server(
            KeyDirectoryServicer(key_directory), server
        )
        gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server(gateway, server)
        usage_service_pb2_grpc.add_UsageServiceServicer_to_server(UsageServicer(ledger), server)
        if starting is not None:
            starting.unlink(missing_ok=True)
            if server.add_insecure_port(f"unix:{starting}") == 0:
                raise OSError(f"could not bind unix:{starting}")
        return REGISTRATION.service_names()

    # The socket is bound under a name no service looks for, and takes its
    # real name only once the server runs: a client that found it earlier
    # would wait on a server that does not answer yet.
    starting = (
        settings.local_socket.with_name(settings.local_socket.name + ".starting")
        if settings.local_socket is not None
        else None
    )
    host = await start_service(
        settings, register, error_domain="mlmesh.gateway", key_view=view, extra_ports=extra_ports
    )
    if starting is not None and settings.local_socket is not None:
        starting.replace(settings.local_socket)
    if http is not None:
        host.on_close.append(http.close)
    gateway.predictions.start()
    host.on_close.append(gateway.predictions.close)
    if tokens is not None and directory is not None:
        warm = asyncio.create_task(_warm_tokenizers(directory, tokens, settings, upstreams))
        host.background.append(warm)
        host.on_close.append(tokens.close)
    if session is not None:
        host.on_close.append(lambda: close_session(session))
    host.on_close.append(key_directory.close)
    host.on_close.append(database.close)
    host.on_close.append(shadow_log.close)
    host.on_close.append(meter.close)
    host.on_close.append(llm.close)
    if triton is not None:
        host.on_close.append(triton.close)
    if directory is not None:
        host.on_close.append(directory.close)
    return host


async def _warm_tokenizers(
    directory: ModelDirectory,
    tokens: PromptTokens,
    settings: GatewaySettings,
    upstreams: dict[str, Upstream],
) -> None:
    """Fetches the served versions' tokenizers at start, so the first
    requests are counted here rather than by a CountTokens round trip."""
    wanted = names(settings.llm_models) + [u.tokenizer for u in upstreams.values() if u.tokenizer]
    for model in dict.fromkeys(wanted):
        try:
            version = int((await directory.served(model)).served.version)
        except Exception as error:  # the registry may not know it (yet)
            log.info("no tokenizer warm-up for %s: %s", model, error)
            continue
        await tokens.ready(model, version)

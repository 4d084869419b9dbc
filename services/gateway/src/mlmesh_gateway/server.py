"""build_server(settings): key store, Envoy authorization, KeyService."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import (
    gateway_service_pb2,
    gateway_service_pb2_grpc,
    key_service_pb2,
    key_service_pb2_grpc,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from mlmesh_chassis.database import Database
from mlmesh_chassis.errors import Unauthenticated
from mlmesh_chassis.server import ServiceHost, start_service
from mlmesh_inference.triton import TritonClient
from mlmesh_metering import Metering
from mlmesh_metering.ledger import UsageLedger

from mlmesh_gateway.authz import Authorizer
from mlmesh_gateway.balancer import LatencyAwareBalancer
from mlmesh_gateway.config import GatewaySettings, names
from mlmesh_gateway.directory import ModelDirectory
from mlmesh_gateway.keys import KeyStore
from mlmesh_gateway.keys_servicer import KeyServicer
from mlmesh_gateway.servicer import GatewayServicer, UsageServicer
from mlmesh_gateway.shadows import ShadowLog
from mlmesh_gateway.telemetry import REJECTIONS

log = logging.getLogger("mlmesh.gateway")
KEY_SERVICE = key_service_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name
GATEWAY = gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
USAGE = usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name
AUTHORIZATION = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name


def _secret_file(path: Path, make: str) -> str:
    """Reads a secret kept in a file, creating it (mode 0600) the first time."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(make + "\n")
    return make


async def ensure_admin_key(keys: KeyStore, settings: GatewaySettings) -> None:
    """Makes sure an admin key exists (the bootstrap one, or the one kept in
    admin_key_file), so the first real keys can be created."""
    secret = settings.bootstrap_admin_key
    if not secret and settings.admin_key_file.exists():
        secret = settings.admin_key_file.read_text().strip()
    if secret:
        try:
            await keys.authenticate(secret)
            return
        except Unauthenticated:
            pass
    admin = pb.Key(
        display_name="bootstrap admin", scopes=pb.KeyScopes(services=[pb.PLATFORM_SERVICE_ADMIN])
    )
    _, secret = await keys.create(admin, secret=secret or None)
    if not settings.bootstrap_admin_key:
        settings.admin_key_file.unlink(missing_ok=True)
        _secret_file(settings.admin_key_file, secret)
        log.info("created the bootstrap admin key", extra={"file": str(settings.admin_key_file)})


async def build_server(settings: GatewaySettings) -> ServiceHost:
    database = Database(
        settings.database_url,
        name="gateway",
        migrations=Path(__file__).parent / "migrations",
        version_table="alembic_version_gateway",
    )
    await database.migrate()
    pepper = settings.key_pepper or _secret_file(settings.pepper_file, secrets.token_hex(32))
    keys = KeyStore(database, pepper.encode(), settings.auth_cache_seconds)
    await ensure_admin_key(keys, settings)

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
    gateway = GatewayServicer(
        keys,
        meter,
        llm,
        triton,
        names(settings.llm_models),
        names(settings.classic_models),
        names(settings.embedding_models),
        directory,
        ShadowLog(database),
    )

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        key_service_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(keys), server)
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authorizer(keys), server)
        gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server(gateway, server)
        usage_service_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageServicer(ledger, keys), server
        )
        return [KEY_SERVICE, GATEWAY, USAGE, AUTHORIZATION]

    host = await start_service(settings, register, error_domain="mlmesh.gateway")
    host.on_close.append(database.close)
    host.on_close.append(meter.close)
    host.on_close.append(llm.close)
    if triton is not None:
        host.on_close.append(triton.close)
    if directory is not None:
        host.on_close.append(directory.close)
    return host

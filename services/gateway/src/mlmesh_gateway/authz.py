"""Envoy external authorization: the same keys on every route.

Envoy asks ``envoy.service.auth.v3.Authorization/Check`` before routing any
request. The route's gRPC service decides the scope a key needs; a valid key
is passed on as ``x-mlmesh-key-id`` (and ``x-mlmesh-actor`` for the
registry's history); a missing, wrong or revoked key gets UNAUTHENTICATED, a
key without the scope PERMISSION_DENIED, each with an ErrorInfo.
"""

from __future__ import annotations

import base64
import logging

from envoy.config.core.v3 import base_pb2 as core
from envoy.service.auth.v3 import external_auth_pb2 as auth
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.errors import MlmeshError, PermissionDenied, to_status

from mlmesh_gateway.keys import KeyStore, authorize, bearer

log = logging.getLogger("mlmesh.gateway.authz")
KEY_ID_HEADER = "x-mlmesh-key-id"
ACTOR_HEADER = "x-mlmesh-actor"
_ANY_KEY = None  # any valid key may call

# Route (gRPC service or method path prefix) -> the scope it needs.
ROUTE_SCOPES: list[tuple[str, int | None]] = [
    ("/mlmesh.gateway.v1.GatewayService/Generate", pb.PLATFORM_SERVICE_GENERATE),
    ("/mlmesh.gateway.v1.GatewayService/Infer", pb.PLATFORM_SERVICE_INFER),
    ("/mlmesh.gateway.v1.GatewayService/Embed", pb.PLATFORM_SERVICE_EMBED),
    ("/mlmesh.gateway.v1.GatewayService/ListModels", _ANY_KEY),
    ("/mlmesh.gateway.v1.KeyService/", pb.PLATFORM_SERVICE_ADMIN),
    ("/mlmesh.gateway.v1.UsageService/", pb.PLATFORM_SERVICE_ADMIN),
    # The llm service is the gateway's backend: callers generate through
    # GatewayService (limits, usage); straight to it is for operators only.
    ("/mlmesh.llm.v1.LlmService/", pb.PLATFORM_SERVICE_ADMIN),
    ("/mlmesh.registry.v1.RegistryService/", pb.PLATFORM_SERVICE_REGISTRY),
    ("/mlmesh.deployer.", pb.PLATFORM_SERVICE_ADMIN),
    ("/mlmesh.features.", pb.PLATFORM_SERVICE_FEATURES),
    ("/mlmesh.vectors.", pb.PLATFORM_SERVICE_VECTORS),
    ("/mlmesh.batch.", pb.PLATFORM_SERVICE_BATCH),
    ("/grpc.reflection.", _ANY_KEY),
]


def scope_of(path: str) -> tuple[bool, int | None]:
    """(known route, scope needed)."""
    for prefix, scope in ROUTE_SCOPES:
        if path.startswith(prefix):
            return True, scope
    return False, None


class Authorizer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    async def Check(self, request, context):  # type: ignore[no-untyped-def]
        http = request.attributes.request.http
        path = http.path
        try:
            known, scope = scope_of(path)
            key = await self.keys.authenticate(bearer(http.headers.get("authorization", "")))
            if not known:
                raise PermissionDenied(f"no route policy for {path}", path=path)
            authorize(key, scope)
        except MlmeshError as error:
            return _denied(error)
        return auth.CheckResponse(
            status=status_pb2.Status(code=0),
            ok_response=auth.OkHttpResponse(
                headers=[_header(KEY_ID_HEADER, key.id), _header(ACTOR_HEADER, f"key:{key.id}")]
            ),
        )


def _header(name: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(
        header=core.HeaderValue(key=name, value=value),
        append_action=core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _denied(error: MlmeshError) -> auth.CheckResponse:
    """A denial gRPC clients read as UNAUTHENTICATED / PERMISSION_DENIED with
    the google.rpc details (Envoy turns the HTTP status into grpc-status)."""
    status = to_status(error, "mlmesh.gateway")
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    http_code = (
        http_status_pb2.Unauthorized
        if error.code.name == "UNAUTHENTICATED"
        else http_status_pb2.Forbidden
    )
    return auth.CheckResponse(
        status=status_pb2.Status(code=status.code.value[0], message=error.message),
        denied_response=auth.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_code),
            headers=[
                _header("grpc-status-details-bin", base64.b64encode(details).decode().rstrip("="))
            ],
            body=error.message,
        ),
    )

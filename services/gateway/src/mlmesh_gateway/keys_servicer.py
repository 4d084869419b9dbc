"""KeyService: create, list, revoke and rotate API keys (ADMIN scope)."""

from __future__ import annotations

import datetime as dt

from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import key_service_pb2 as rpc
from mlmesh.gateway.v1 import key_service_pb2_grpc
from mlmesh_chassis.pagination import offset_page

from mlmesh_gateway.keys import KeyStore, authorize

DEFAULT_GRACE = dt.timedelta(hours=1)


class KeyServicer(key_service_pb2_grpc.KeyServiceServicer):
    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    async def _admin(self, context) -> pb.Key:  # type: ignore[no-untyped-def]
        """The caller's key, which must have ADMIN scope (checked here too, not
        only by Envoy: this service must not trust a caller that bypassed it)."""
        key = await self.keys.authenticate_call(context)
        authorize(key, pb.PLATFORM_SERVICE_ADMIN)
        return key

    async def CreateKey(self, request, context):  # type: ignore[no-untyped-def]
        await self._admin(context)
        key, secret = await self.keys.create(request.key)
        return rpc.CreateKeyResponse(key=key, secret=secret)

    async def GetKey(self, request, context):  # type: ignore[no-untyped-def]
        await self._admin(context)
        return rpc.GetKeyResponse(key=await self.keys.get(request.id))

    async def ListKeys(self, request, context):  # type: ignore[no-untyped-def]
        await self._admin(context)
        keys, token = offset_page(
            await self.keys.list(request.state), request.page_size, request.page_token
        )
        return rpc.ListKeysResponse(keys=keys, next_page_token=token)

    async def RevokeKey(self, request, context):  # type: ignore[no-untyped-def]
        await self._admin(context)
        return rpc.RevokeKeyResponse(key=await self.keys.revoke(request.id, request.reason))

    async def RotateKey(self, request, context):  # type: ignore[no-untyped-def]
        await self._admin(context)
        grace = (
            request.grace_period.ToTimedelta()
            if request.HasField("grace_period")
            else DEFAULT_GRACE
        )
        key, secret = await self.keys.rotate(request.id, grace)
        return rpc.RotateKeyResponse(key=key, secret=secret)

"""KeyService: create, list, revoke and rotate API keys.

The chassis has checked the caller's ADMIN scope before any of these run.
Each write is published at once through the key directory, so this replica
and every service watching it see the change within milliseconds (other
gateway replicas within their poll interval).
"""

from __future__ import annotations

import datetime as dt

from mlmesh.gateway.v1 import key_service_pb2 as rpc
from mlmesh.gateway.v1 import key_service_pb2_grpc
from mlmesh_chassis.pagination import offset_page

from mlmesh_gateway.key_directory import KeyDirectory
from mlmesh_gateway.keys import KeyStore

DEFAULT_GRACE = dt.timedelta(hours=1)


class KeyServicer(key_service_pb2_grpc.KeyServiceServicer):
    def __init__(self, keys: KeyStore, directory: KeyDirectory) -> None:
        self.keys = keys
        self.directory = directory

    async def CreateKey(self, request, context):  # type: ignore[no-untyped-def]
        key, secret = await self.keys.create(request.key)
        await self.directory.refresh()
        return rpc.CreateKeyResponse(key=key, secret=secret)

    async def GetKey(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.GetKeyResponse(key=await self.keys.get(request.id))

    async def ListKeys(self, request, context):  # type: ignore[no-untyped-def]
        keys, token = offset_page(
            await self.keys.list(request.state), request.page_size, request.page_token
        )
        return rpc.ListKeysResponse(keys=keys, next_page_token=token)

    async def RevokeKey(self, request, context):  # type: ignore[no-untyped-def]
        key = await self.keys.revoke(request.id, request.reason)
        await self.directory.refresh()
        return rpc.RevokeKeyResponse(key=key)

    async def RotateKey(self, request, context):  # type: ignore[no-untyped-def]
        grace = (
            request.grace_period.ToTimedelta()
            if request.HasField("grace_period")
            else DEFAULT_GRACE
        )
        key, secret = await self.keys.rotate(request.id, grace)
        await self.directory.refresh()
        return rpc.RotateKeyResponse(key=key, secret=secret)
